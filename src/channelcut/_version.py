"""The package version (its own module: every other module can import it)."""

__version__ = "0.1.0"
