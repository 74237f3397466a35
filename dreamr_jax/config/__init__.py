"""Configuration: frozen dataclasses (`schema`) loaded from YAML with overrides (`loader`)."""

from dreamr_jax.config.loader import ConfigError, config_to_dict, load_config, save_config
from dreamr_jax.config.schema import Config, MeshConfig, ModelConfig, TextConfig, VisionConfig

__all__ = [
    "Config",
    "ConfigError",
    "MeshConfig",
    "ModelConfig",
    "TextConfig",
    "VisionConfig",
    "config_to_dict",
    "load_config",
    "save_config",
]
