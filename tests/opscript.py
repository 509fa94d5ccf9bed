"""One op script, two executors: qemu-io and qednbd's engine.

An op script is a list of qemu-io command strings. :func:`run_qemu_io` hands them to
qemu-io; :func:`run_engine` applies the same operations through ``QedImage``. Comparing
the two image files byte for byte (``cmp``) is our allocation-order parity test.

Supported commands (qemu-io syntax): ``write [-P PATTERN] OFF LEN``, ``write -z OFF LEN``,
``discard OFF LEN``, ``flush``. qemu-io's default write pattern is 0xcd.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from helpers import REPO_ROOT, StrPath, qemu_io

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from qednbd.cli import parse_size
from qednbd.qed.image import QedImage

QEMU_IO_DEFAULT_PATTERN = 0xCD


def run_qemu_io(path: StrPath, ops: list[str]) -> None:
    out = qemu_io(path, *ops)
    text = out.stdout + out.stderr
    if "failed" in text or "error" in text.lower():
        raise AssertionError(f"qemu-io reported a failure: {text}")


def apply_op(image: QedImage, op: str) -> None:
    words = shlex.split(op)
    name, args = words[0], words[1:]
    if name == "write":
        if args[0] == "-z":
            image.write_zeroes(parse_size(args[1]), parse_size(args[2]))
            return
        pattern = QEMU_IO_DEFAULT_PATTERN
        if args[0] == "-P":
            pattern = int(args[1], 0)
            args = args[2:]
        offset, length = parse_size(args[0]), parse_size(args[1])
        image.write(offset, bytes([pattern]) * length)
    elif name == "discard":
        image.trim(parse_size(args[0]), parse_size(args[1]))
    elif name == "flush":
        image.flush()
    else:
        raise ValueError(f"unsupported op: {op}")


def run_engine(path: StrPath, ops: list[str]) -> None:
    with QedImage.open(os.fspath(path)) as image:
        for op in ops:
            apply_op(image, op)


def same_bytes(a: StrPath, b: StrPath) -> bool:
    return Path(a).read_bytes() == Path(b).read_bytes()
