"""The package version; pyproject.toml's `version` says the same (tests/test_cli.py checks)."""

__version__ = "0.1.0"
