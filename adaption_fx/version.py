"""The package version (one place; ``adapter_config.json`` records it)."""

__version__ = "0.1.0"
