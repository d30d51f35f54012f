"""Configuration: the typed schemas (schema.py), each router's own section and checks (routers.py), the
router/expert name registry (registry.py), the checks that need only the config (validate.py), the errors they
raise (errors.py).

No module here imports torch or transformers (tests/test_config.py blocks them and imports every one): train.py
validates a config before the training stack loads. The checks that need the architecture but no weights are in
models/prechecks.py.
"""

from lightning_moe.config.schema import ConfigError, Sections
from lightning_moe.config.validate import validate_config

__all__ = ["ConfigError", "Sections", "validate_config"]
