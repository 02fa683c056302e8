"""Recording: per-step activations, weight changes and scalars of any training run, on disk."""

from capwrap.recording.recorder import DEFAULT_COMPONENT_KINDS, Recorder, load_probe, start_weights
from capwrap.recording.store import RunStore

__all__ = ["DEFAULT_COMPONENT_KINDS", "Recorder", "RunStore", "load_probe", "start_weights"]
