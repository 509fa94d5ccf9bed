"""qednbd: a QED image engine and NBD server."""

__version__ = "0.1.0"
