"""The version, alone, so that low modules can name it without importing the package's faces."""

__version__ = "0.1.0"
