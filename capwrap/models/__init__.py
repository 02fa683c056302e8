"""Models: one interface over TransformerLens's HookedTransformer and TransformerBridge.

See :class:`CapModel` for the interface, :func:`build_model` / :func:`load_model` /
:func:`save_model` to get and keep models, and :class:`ComponentMap` for heads and neurons.
"""

from capwrap.models.components import Component, ComponentMap, ParamSlice
from capwrap.models.io import describe_model, load_model, save_model
from capwrap.models.live import wrap_hf_model
from capwrap.models.model import Backend, CapModel, available_backends, build_model, default_backend, tl_version
from capwrap.models.spec import ModelSpec

__all__ = [
    "Backend",
    "CapModel",
    "Component",
    "ComponentMap",
    "ModelSpec",
    "ParamSlice",
    "available_backends",
    "build_model",
    "default_backend",
    "describe_model",
    "load_model",
    "save_model",
    "tl_version",
    "wrap_hf_model",
]
