"""What ``qednbd info`` reports, with qemu-img's keys and wording.

``dirty-flag`` is read from the header's NEED_CHECK bit. qemu-img reports ``false`` for
a QED image whose bit is set (its read-only open clears the bit in memory); we report
what is on disk.
"""

from __future__ import annotations

import math

from qednbd.qed.backing import resolve_backing_path
from qednbd.qed.image import QedImage

_SUFFIXES = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(n_bytes: int) -> str:
    """qemu-img's size_to_str: three significant digits, switching unit at 1000."""
    exponent = math.frexp(n_bytes / (1000.0 / 1024.0))[1]
    unit = int((exponent - 1) / 10)  # C division: truncates toward zero
    unit = max(0, min(unit, len(_SUFFIXES) - 1))
    return f"{n_bytes / (1 << (unit * 10)):0.3g} {_SUFFIXES[unit]}"


def image_info(image: QedImage, actual_size: int) -> dict[str, object]:
    info: dict[str, object] = {}
    if image.backing_format:
        info["backing-filename-format"] = image.backing_format
    info["virtual-size"] = image.size
    info["filename"] = image.path
    info["cluster-size"] = image.cluster_size
    info["format"] = "qed"
    info["actual-size"] = actual_size
    if image.backing_name:
        info["full-backing-filename"] = resolve_backing_path(image.path, image.backing_name)
        info["backing-filename"] = image.backing_name
    info["dirty-flag"] = image.header.need_check
    return info


def human_info(info: dict[str, object]) -> str:
    lines = [
        f"image: {info['filename']}",
        "file format: qed",
        f"virtual size: {human_size(int(str(info['virtual-size'])))} ({info['virtual-size']} bytes)",
        f"disk size: {human_size(int(str(info['actual-size'])))}",
        f"cluster_size: {info['cluster-size']}",
    ]
    if "backing-filename" in info:
        name, full = info["backing-filename"], info["full-backing-filename"]
        lines.append(f"backing file: {name}" + ("" if name == full else f" (actual path: {full})"))
        if "backing-filename-format" in info:
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info["dirty-flag"]:
        lines.append("dirty flag: yes (not closed cleanly: the image needs a consistency check)")
    return "\n".join(lines)
