"""Configuration: the typed schemas (schema.py), the router/expert name registry (registry.py), the checks that
need only the config (validate.py, torch-free) and those that need the architecture but no weights (prechecks.py).

Importing this package imports no torch: train.py validates a config before the training stack loads.
"""

from lightning_moe.config.schema import ConfigError, Sections
from lightning_moe.config.validate import validate_config

__all__ = ["ConfigError", "Sections", "validate_config"]
