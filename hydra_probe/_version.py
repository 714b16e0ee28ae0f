"""The package version (its own module, so nothing below the top imports the package root)."""

__version__ = "0.2.0"
