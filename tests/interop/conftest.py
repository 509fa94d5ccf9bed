"""Fixtures for the interop matrix: build images with the QEMU tools, read them back through QEMU.

Each fixture returns a small function so test modules need no helpers of their own:

* ``make_layers(specs)`` builds a chain of raw/QED files with qemu-img and qemu-io and returns
  the top file's path; each spec is a dict of :class:`Layer`'s fields, bottom layer first;
* ``qemu_raw(path, fmt)`` is ``qemu-img convert -O raw`` of an image, as bytes;
* ``qemu_check(path)`` runs ``qemu-img check`` and fails the test unless it exits 0.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import qemu_img, qemu_io


@dataclass(frozen=True)
class Layer:
    """One file of a chain. ``backing`` is the name written into a QED header, verbatim."""

    name: str
    fmt: str  # "raw" or "qed"
    size: int | str
    cluster_size: int | None = None
    table_size: int | None = None
    backing: str | None = None
    backing_fmt: str | None = None
    ops: Sequence[str] = field(default_factory=tuple)  # qemu-io commands


def qed_opts(cluster_size: int | None, table_size: int | None) -> list[str]:
    items = []
    if cluster_size is not None:
        items.append(f"cluster_size={cluster_size}")
    if table_size is not None:
        items.append(f"table_size={table_size}")
    return ["-o", ",".join(items)] if items else []


def qemu_io_ok(path: Path, ops: Sequence[str], fmt: str) -> None:
    """Run qemu-io commands; fail if any of them reports a failure."""
    if not ops:
        return
    out = qemu_io(path, *ops, fmt=fmt)
    text = out.stdout + out.stderr
    assert "failed" not in text and "error" not in text.lower(), text


def build_layers(directory: Path, specs: Sequence[dict[str, object]]) -> Path:
    """Create each layer in order (bottom first) in ``directory``; return the last one's path."""
    top = directory
    for spec in specs:
        layer = Layer(**spec)  # type: ignore[arg-type]  # specs are literal dicts in the test tables
        path = directory / layer.name
        path.parent.mkdir(parents=True, exist_ok=True)
        if layer.fmt == "raw":
            qemu_img("create", "-f", "raw", path, str(layer.size))
        else:
            args: list[str] = ["create", "-f", "qed", *qed_opts(layer.cluster_size, layer.table_size)]
            if layer.backing is not None:
                args += ["-b", layer.backing, "-F", layer.backing_fmt or "qed"]
            qemu_img(*args, path, str(layer.size))
        qemu_io_ok(path, layer.ops, layer.fmt)
        top = path
    return top


@pytest.fixture
def make_layers(tmp_path: Path) -> Callable[[Sequence[dict[str, object]]], Path]:
    return lambda layers: build_layers(tmp_path, layers)


@pytest.fixture
def qemu_raw(tmp_path: Path) -> Callable[..., bytes]:
    """``qemu-img convert -f FMT -O raw PATH`` (backing chain flattened), as bytes."""
    counter = itertools.count()

    def convert(path: Path, fmt: str = "qed") -> bytes:
        out = tmp_path / f"qemu-export-{next(counter)}.raw"
        qemu_img("convert", "-f", fmt, "-O", "raw", path, out)
        data = out.read_bytes()
        out.unlink()
        return data

    return convert


@pytest.fixture
def qemu_check() -> Callable[[Path], str]:
    def check(path: Path) -> str:
        proc = qemu_img("check", "-f", "qed", path, check=False)
        assert proc.returncode == 0, (
            f"qemu-img check {path}: rc {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
        return proc.stdout

    return check
