"""Configuration: schema, embedded default and loader."""

from sentinel.config.loader import ConfigError, default_yaml_text, load_config
from sentinel.config.schema import SentinelConfig

__all__ = ["ConfigError", "SentinelConfig", "default_yaml_text", "load_config"]
