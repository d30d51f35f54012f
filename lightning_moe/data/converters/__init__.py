"""Converters from third-party datasets into the project chat format (JSON Lines)."""
