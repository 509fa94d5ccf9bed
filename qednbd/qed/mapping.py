"""Allocation through a backing chain, in the shape ``qemu-img map --output=json`` prints.

For each guest range the answer comes from the first layer that has it: data (with
its file and host offset), a zero cluster, a hole in a raw file (zero, with an offset),
or nothing. ``depth`` counts layers from the top image (0). A range past the end of a
shorter backing file, or with no backing file at all, is ``present: false`` at the depth
of the deepest layer that still covers it — QEMU's numbering, verified with 7.2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from qednbd.qed.image import Layer, QedImage


@dataclass(frozen=True, slots=True)
class MapExtent:
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    filename: str | None  # the file holding the data (for human output)

    def mergeable(self, nxt: MapExtent) -> bool:
        if (self.depth, self.present, self.zero, self.data, self.filename) != (
            nxt.depth,
            nxt.present,
            nxt.zero,
            nxt.data,
            nxt.filename,
        ):
            return False
        if self.offset is None or nxt.offset is None:
            return self.offset is nxt.offset
        return self.offset + self.length == nxt.offset

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start,
            "length": self.length,
            "depth": self.depth,
            "present": self.present,
            "zero": self.zero,
            "data": self.data,
        }
        if self.offset is not None:
            out["offset"] = self.offset
        return out


def _layer_extents(layer: Layer | QedImage, depth: int, pos: int, length: int) -> list[MapExtent]:
    out: list[MapExtent] = []
    for run in layer.status(pos, length):
        if run.kind == "data":
            out.append(MapExtent(pos, run.length, depth, True, False, True, run.offset, layer.path))
        elif run.kind == "zero":
            out.append(MapExtent(pos, run.length, depth, True, True, False, run.offset, None))
        else:
            out.extend(_below(layer, depth, pos, run.length))
        pos += run.length
    return out


def _below(layer: Layer | QedImage, depth: int, pos: int, length: int) -> list[MapExtent]:
    """An unallocated range of ``layer``: what its backing chain says about it."""
    backing = layer.backing
    covered = 0 if backing is None else max(0, min(length, backing.size - pos))
    out: list[MapExtent] = []
    if covered and backing is not None:
        out.extend(_layer_extents(backing, depth + 1, pos, covered))
    if covered < length:
        out.append(MapExtent(pos + covered, length - covered, depth, False, True, False, None, None))
    return out


def map_image(image: QedImage, pos: int = 0, length: int | None = None) -> list[MapExtent]:
    """Merged extents over [pos, pos+length) (the whole image by default)."""
    if length is None:
        length = image.size - pos
    if length == 0:  # qemu-img map prints one empty extent for an empty image
        return [MapExtent(pos, 0, 0, False, False, False, None, None)]
    merged: list[MapExtent] = []
    for ext in _layer_extents(image, 0, pos, length):
        if merged and merged[-1].mergeable(ext):
            last = merged[-1]
            merged[-1] = replace(last, length=last.length + ext.length)
        else:
            merged.append(ext)
    return merged
