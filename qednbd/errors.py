"""The project's exception hierarchy.

Every error the program raises on purpose derives from :class:`QednbdError`, so the
command line can turn any of them into a one-line message and a non-zero exit, and an
unexpected exception (a bug) stays distinguishable by its type.
"""

from __future__ import annotations

import errno as _errno


class QednbdError(Exception):
    """Root of every deliberate qednbd error."""


class ImageError(QednbdError):
    """An I/O-class failure on an image; carries the errno a block device would return."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.errno = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidImage(ImageError):
    """The file is not a usable QED image (bad header, bad geometry, bad table offset)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, message)


class UnsupportedFeature(ImageError):
    """The image uses something we do not implement (unknown incompatible feature bits)."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.ENOTSUP, message)


class NbdProtocolError(QednbdError):
    """A peer broke the NBD protocol in a way that ends the connection."""


class ConfigError(QednbdError):
    """Invalid command-line or configuration-file input."""
