"""The package version: one home, read by ``pyproject.toml`` and recorded in tuning work dirs."""

VERSION = "0.1.0"
