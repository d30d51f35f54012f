"""The project's two kinds of user-facing failure (lightning_moe/cli.py turns each into one line and an exit code).
A module of their own so that every config module can raise them without importing the schema."""


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what is allowed."""


class RunFailure(Exception):
    """A run that failed for a reason its message names (e.g. a full disk): reported in one line, exit code 1."""
