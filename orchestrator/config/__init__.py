"""One typed configuration tree for a raydiff run (``schema``), loaded from ``jobs/*.yaml`` with
``key.sub=value`` overrides (``loading``). Callers import from this package."""

from orchestrator.config.loading import (
    apply_overrides,
    config_to_dict,
    config_to_yaml,
    load_config,
    load_config_text,
    parse_override,
    validate_config,
)
from orchestrator.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DiffusionConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    RunConfig,
    S3Config,
    SamplePrecision,
    SamplingConfig,
    ScalingConfig,
    StorageConfig,
    TrainConfig,
    _Strict,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DiffusionConfig", "LoggingConfig", "ModelConfig", "OptimConfig",
    "PrecisionConfig", "RunConfig", "S3Config", "SamplePrecision", "SamplingConfig", "ScalingConfig", "StorageConfig", "TrainConfig", "_Strict",
    "apply_overrides", "config_to_dict", "config_to_yaml", "load_config", "load_config_text", "parse_override",
    "validate_config",
]
