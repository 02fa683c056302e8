"""capwrap: did fine-tuning change a capability, or only wrap it?

The public API. Models (:class:`CapModel` over TransformerLens's HookedTransformer or
TransformerBridge), tasks (:class:`PCFGTask`), one training loop (:func:`train`), per-step
recording (:class:`Recorder`, :class:`RunStore`), analyzers (each returns :class:`Evidence`),
:func:`diagnose` (their verdict) and the demo study (:func:`run_demo`).

Examples:
    >>> import capwrap
    >>> task = capwrap.PCFGTask(family="count", operand="a")
    >>> model = capwrap.build_model(capwrap.ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=1, d_model=32))
    >>> 0.0 <= capwrap.accuracy(model, task.sample(64, seed=0)) <= 1.0
    True
"""

__version__ = "0.1.0"

from capwrap.analyzers import (  # noqa: E402
    Analyzer,
    AttentionComparison,
    Context,
    Evidence,
    Generalization,
    ModelPair,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    Subgraph,
    WeightDiff,
    activation_patching,
)
from capwrap.demo import DemoResult, run_demo  # noqa: E402
from capwrap.diagnosis import Diagnosis, Finding, VerdictRule, default_analyzers, diagnose  # noqa: E402
from capwrap.errors import (  # noqa: E402
    CapwrapError,
    CapwrapWarning,
    CheckpointError,
    ConfigError,
    HookNameError,
    StoreError,
    TrainingDivergedError,
)
from capwrap.methods import NPO, CircuitTuning, FineTune, GradientAscent, LoRA, TrainingMethod  # noqa: E402
from capwrap.models import (  # noqa: E402
    CapModel,
    ComponentMap,
    ModelSpec,
    available_backends,
    build_model,
    default_backend,
    load_model,
    save_model,
    wrap_hf_model,
)
from capwrap.models.generation import generate  # noqa: E402
from capwrap.recording import Recorder, RunStore  # noqa: E402
from capwrap.tasks import (  # noqa: E402
    Feature,
    PCFGConfig,
    PCFGTask,
    Task,
    TaskBatch,
    TextTask,
    accuracy,
    feature_frequency,
    filter_out,
    load_texts,
)
from capwrap.training import TrainConfig, TrainResult, train  # noqa: E402

__all__ = [
    "Analyzer",
    "AttentionComparison",
    "CircuitTuning",
    "Context",
    "Diagnosis",
    "Evidence",
    "Finding",
    "Generalization",
    "NewLatentProbing",
    "VerdictRule",
    "FineTune",
    "GradientAscent",
    "LoRA",
    "ModelPair",
    "NPO",
    "Patching",
    "Probing",
    "Pruning",
    "Revival",
    "Subgraph",
    "WeightDiff",
    "activation_patching",
    "default_analyzers",
    "diagnose",
    "Feature",
    "TextTask",
    "feature_frequency",
    "filter_out",
    "generate",
    "load_texts",
    "CapModel",
    "CapwrapError",
    "CapwrapWarning",
    "CheckpointError",
    "ComponentMap",
    "ConfigError",
    "DemoResult",
    "HookNameError",
    "ModelSpec",
    "PCFGConfig",
    "PCFGTask",
    "Recorder",
    "RunStore",
    "StoreError",
    "Task",
    "TaskBatch",
    "TrainConfig",
    "TrainResult",
    "TrainingMethod",
    "TrainingDivergedError",
    "__version__",
    "accuracy",
    "available_backends",
    "build_model",
    "default_backend",
    "load_model",
    "run_demo",
    "save_model",
    "train",
    "wrap_hf_model",
]


def __getattr__(name: str):
    """``capwrap.integrations`` (the Hugging Face ``Trainer`` callback) is imported on first use."""
    if name == "integrations":
        import importlib

        return importlib.import_module("capwrap.integrations")
    raise AttributeError(f"module 'capwrap' has no attribute {name!r}")
