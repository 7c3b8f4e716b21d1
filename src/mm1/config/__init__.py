"""Every knob of an mm1 run, as nested keyword-only dataclasses.

Why this package exists: a run is fully described by one `Config`. Recipes (`mm1.recipes`) build one,
the command line changes it with dotted overrides (`model.connector.kind=attention_pool`), and
`validate` rejects impossible settings with one clear line *before* any compute starts. Every run
writes the resolved config next to its outputs, so a result can always be traced to its settings.

`schema.py` holds the dataclasses, `overrides.py` the dotted keys, `validate.py` the checks and
`io.py` the JSON form, `inference.py` what a run's config says about using its model (prompt format,
sub-image grid); import everything from `mm1.config`.
"""

from mm1.config.inference import InferenceSettings
from mm1.config.io import (
    MOVED,
    from_dict,
    from_saved,
    load,
    save,
    to_dict,
)
from mm1.config.overrides import (
    ALIASES,
    apply_override,
    apply_overrides,
    parse_scalar,
)
from mm1.config.schema import (
    Activation,
    AttentionImpl,
    CheckpointConfig,
    ComponentConfig,
    Config,
    ConfigError,
    ConnectorConfig,
    ConnectorKind,
    DataConfig,
    DecoderConfig,
    EvalConfig,
    ImageNorm,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OnNonFinite,
    OptimizerConfig,
    OptimizerKind,
    PackingConfig,
    ParallelKind,
    Precision,
    PrepareConfig,
    PromptFormat,
    RopeScaling,
    RopeScalingConfig,
    ScheduleConfig,
    SourceConfig,
    SourceKind,
    Stage,
    SynthConfig,
    TrainConfig,
    VisionConfig,
)
from mm1.config.validate import (
    validate,
)

__all__ = [
    "ALIASES",
    "MOVED",
    "Activation",
    "AttentionImpl",
    "CheckpointConfig",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "ConnectorConfig",
    "ConnectorKind",
    "DataConfig",
    "DecoderConfig",
    "EvalConfig",
    "ImageNorm",
    "InferenceSettings",
    "LoggingConfig",
    "MoEConfig",
    "ModelConfig",
    "OnNonFinite",
    "OptimizerConfig",
    "OptimizerKind",
    "PackingConfig",
    "ParallelKind",
    "Precision",
    "PrepareConfig",
    "PromptFormat",
    "RopeScaling",
    "RopeScalingConfig",
    "ScheduleConfig",
    "SourceConfig",
    "SourceKind",
    "Stage",
    "SynthConfig",
    "TrainConfig",
    "VisionConfig",
    "apply_override",
    "apply_overrides",
    "from_dict",
    "from_saved",
    "load",
    "parse_scalar",
    "save",
    "to_dict",
    "validate",
]
