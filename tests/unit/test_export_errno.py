"""export.nbd_errno: the one place host errnos become NBD errors."""

from __future__ import annotations

import errno

import pytest

from qednbd.errors import ImageError, InvalidImage
from qednbd.export import nbd_errno
from qednbd.nbd.constants import Errno


@pytest.mark.parametrize(
    ("host", "nbd"),
    [
        (errno.EPERM, Errno.EPERM),
        (errno.EROFS, Errno.EPERM),
        (errno.EIO, Errno.EIO),
        (errno.ENOMEM, Errno.ENOMEM),
        (errno.EINVAL, Errno.EINVAL),
        (errno.ENOSPC, Errno.ENOSPC),
        (errno.EDQUOT, Errno.ENOSPC),
        (errno.EFBIG, Errno.ENOSPC),
        (errno.EOVERFLOW, Errno.EOVERFLOW),
        (errno.ENOTSUP, Errno.ENOTSUP),
        (errno.ESHUTDOWN, Errno.ESHUTDOWN),
        (errno.EBADF, Errno.EIO),  # anything else is an I/O error
        (errno.ENOENT, Errno.EIO),
    ],
)
def test_host_errnos_map_onto_the_nbd_set(host: int, nbd: Errno) -> None:
    assert nbd_errno(ImageError(host, "x")) == nbd
    assert nbd_errno(OSError(host, "x")) == nbd


def test_errors_without_errno_are_eio() -> None:
    assert nbd_errno(RuntimeError("bug")) == Errno.EIO
    assert nbd_errno(InvalidImage("bad table")) == Errno.EINVAL
