"""The corrupt-image corpus of ``tests/data/``: ``qednbd check`` against ``qemu-img check``, with
and without repair, on copies of every file.

Each file is a small 4K/table_size 2 image damaged in one known way (``tests/data/README.md``
lists the recipes; ``tests/data/make_corpus.py`` regenerates them). For each one:

(a) ``qednbd check`` prints what ``qemu-img check`` prints and exits the same way (on this
    corpus there is no exception: every file is far below the ``cluster_size - 1`` clusters
    where QEMU's leak count goes wrong);
(b) after ``qemu-img check -r all`` on copy A and ``qednbd check -r all`` on copy B, qemu-img
    finds no corruption in B; where qemu-img itself repairs everything (invalid offsets only),
    A and B read the same, and where there are no leaks they are the same bytes. Beyond QEMU:
    a cluster referenced twice still reads, at every guest offset, what it read before the
    repair; an entry pointing into metadata (L1, an L2 table) is cleared and reads as
    unallocated (zeros, or the backing file) instead of the metadata QEMU serves there;
(c) leaked clusters are given back: none is left at the end of the file, the interior ones
    are host holes (qemu-img still counts a hole as a leaked cluster: the file keeps its
    length there);
(d) a second ``-r all`` changes nothing;
(e) ``-r leaks`` clears invalid offsets exactly as QEMU does (in both modes) and gives leaked
    space back, but leaves duplicates and entries into metadata as they are: every guest
    offset reads what it reads after qemu-img's repair, and the check still counts them
    (one difference, on purpose: a dirty image keeps NEED_CHECK while damage is left, where
    qemu-img's close clears it whatever its check found);
(f) the repair's human output has qemu-img's shape, and its JSON qemu-img's fields.

The guest contents are compared cluster by cluster against :func:`guest_view`, a reader
of the unrepaired file written here from the format (qed.md §3), independent of the
engine; where QEMU can read the whole unrepaired image, the view is checked against
``qemu-img convert`` first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from helpers import REPO_ROOT, qednbd, qemu_img, read_features, run

from qednbd import cli
from qednbd.qed.check import FindingKind, check
from qednbd.qed.image import QedImage

DATA = REPO_ROOT / "tests" / "data"
CS = 4096
K, M = 1 << 10, 1 << 20
F_NEED_CHECK = 0x2
HEADER = struct.Struct("<IIIIQQQQQII")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", DATA / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_corpus", module)  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


make_corpus = _load_generator()
CORPUS = sorted(c.name for c in make_corpus.CASES if c.name.endswith(".qed"))
SUPPORT = ("backing.raw",)  # not a case of its own: the backing file of backing-raw-damaged.qed


@dataclass(frozen=True)
class Expect:
    """What the repairs should do to one corpus file.

    ``qemu_repairs``: qemu-img's ``-r all`` leaves no corruption (the damage is invalid
    offsets and leaks only). ``cleared``: guest cluster indices whose entries point into
    metadata, which our ``-r all`` clears (beyond QEMU). ``same_bytes``: our ``-r all``
    writes exactly what qemu-img's does (no leaks, no partial cluster to give back).
    """

    qemu_repairs: bool
    cleared: tuple[int, ...] = ()
    same_bytes: bool = False


G4M = 4 * M // CS  # guest cluster index of 4M: the first one L2#1 serves
SECOND_HALF = tuple(range(G4M, 2 * G4M))
EXPECT: dict[str, Expect] = {
    "clean.qed": Expect(True, same_bytes=True),
    "l2-past-eof.qed": Expect(True, same_bytes=True),
    "l2-unaligned.qed": Expect(True, same_bytes=True),
    "l2-into-header-unaligned.qed": Expect(True, same_bytes=True),
    "header-size-2-into-header.qed": Expect(True, same_bytes=True),
    "l1-past-eof.qed": Expect(True),
    "l1-unaligned.qed": Expect(True),
    "l1-table-crosses-eof.qed": Expect(True),
    "l1-unaddressable-past-eof.qed": Expect(True, same_bytes=True),
    "l2-duplicate.qed": Expect(False),
    "l2-duplicate-across-tables.qed": Expect(False),
    "l2-into-l1.qed": Expect(False, cleared=(2,)),
    "l2-into-own-l2.qed": Expect(False, cleared=(2,)),
    "l2-into-other-l2.qed": Expect(False, cleared=(2,)),
    "l1-shared.qed": Expect(False),
    "l1-overlapping.qed": Expect(False, cleared=SECOND_HALF),
    "l1-into-l1.qed": Expect(False, cleared=SECOND_HALF),
    "l1-into-data.qed": Expect(False, cleared=SECOND_HALF),  # guest 4k and 12k keep their data
    "leak-interior.qed": Expect(True),
    "leak-end.qed": Expect(True),
    "leak-interior-and-end.qed": Expect(True),
    "junk-partial.qed": Expect(True),
    "truncated-data.qed": Expect(True),
    "truncated-table.qed": Expect(True),
    "dirty-clean.qed": Expect(True, same_bytes=True),
    "dirty-damaged.qed": Expect(True),
    "dirty-duplicate.qed": Expect(False, cleared=(5,)),
    "header-unknown-compat.qed": Expect(True, same_bytes=True),
    "header-unknown-autoclear.qed": Expect(True),
    "backing-raw-damaged.qed": Expect(False),
    "combo.qed": Expect(False, cleared=(6, G4M + 1)),
    "combo-tables.qed": Expect(False),  # the overlapping table hangs at L1[2], past the 8M guest
}
# Only duplicates: our repair must not change a single guest byte.
DUPLICATES_ONLY = ("l2-duplicate.qed", "l2-duplicate-across-tables.qed", "l1-shared.qed")


# -- helpers ----------------------------------------------------------------------------


def copy_case(name: str, directory: Path) -> Path:
    """A copy of a corpus file (and the backing file beside it) in its own directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for support in SUPPORT:
        shutil.copyfile(DATA / support, directory / support)
    shutil.copyfile(DATA / name, directory / name)
    return directory / name


def ours(*args: str | Path) -> tuple[int, str, str]:
    """``qednbd ARGS`` run in this process (the same code as the command): (exit, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli.main([os.fspath(a) for a in args])
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out.getvalue(), err.getvalue()


def qemu_check(path: Path, *repair: str) -> tuple[int, dict[str, object]]:
    proc = qemu_img("check", "-f", "qed", *repair, "--output=json", path, check=False)
    assert proc.stdout.startswith("{"), proc.stdout + proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def our_check(path: Path, *repair: str) -> tuple[int, dict[str, object]]:
    code, out, err = ours("check", *repair, "--output=json", path)
    assert err == "", err
    return code, json.loads(out)


def convert(path: Path) -> bytes | None:
    """``qemu-img convert -O raw`` of the image (backing chain flattened); None if QEMU cannot read it."""
    out = path.with_suffix(".export.raw")
    proc = qemu_img("convert", "-f", "qed", "-O", "raw", path, out, check=False)
    if proc.returncode != 0:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def guest_view(path: Path) -> list[bytes | None]:
    """What each guest cluster reads, from the file's tables; None where the read fails.

    Written from the format, not from the engine: an L1 entry must be an aligned table
    offset whose whole table lies after the header and before the end of the file (its
    length rounded down to a cluster); an L2 entry is 0 (unallocated: the backing file,
    or zeros), 1 (zeros) or an aligned data cluster offset in the same bounds.
    """
    raw = path.read_bytes()
    _, cs, ts, hs, features, _, _, l1_offset, size, name_at, name_len = HEADER.unpack_from(raw)
    backing = b""
    if features & 1 and name_len:
        backing = (path.parent / raw[name_at : name_at + name_len].decode()).read_bytes()
    file_size = len(raw) // cs * cs
    entries = cs * ts // 8

    def u64(offset: int) -> int:
        return int(struct.unpack_from("<Q", raw, offset)[0])

    def cluster_ok(offset: int) -> bool:
        return offset % cs == 0 and hs * cs <= offset < file_size

    def from_backing(g: int) -> bytes:
        return backing[g * cs : (g + 1) * cs].ljust(cs, b"\0")

    view: list[bytes | None] = []
    for g in range(-(-size // cs)):
        table = u64(l1_offset + 8 * (g // entries))
        if table == 0:
            view.append(from_backing(g))
            continue
        if not (cluster_ok(table) and cluster_ok(table + (ts - 1) * cs)):
            view.append(None)
            continue
        entry = u64(table + 8 * (g % entries))
        if entry == 0:
            view.append(from_backing(g))
        elif entry == 1:
            view.append(bytes(cs))
        elif cluster_ok(entry):
            view.append(raw[entry : entry + cs])
        else:
            view.append(None)
    return view


def view_of_qemu_readable(path: Path) -> list[bytes | None]:
    """:func:`guest_view`, checked against QEMU's reading of the file wherever QEMU can read it all."""
    view = guest_view(path)
    exported = convert(path)
    if None in view:
        assert exported is None, f"{path.name}: QEMU reads what the view says fails"
    else:
        assert exported is not None, f"{path.name}: QEMU cannot read what the view says is fine"
        assert b"".join(v or b"" for v in view) == exported
    return view


def clusters(data: bytes) -> list[bytes]:
    return [data[i : i + CS] for i in range(0, len(data), CS)]


def differing(a: list[bytes] | list[bytes | None], b: list[bytes | None]) -> list[int]:
    return [g for g, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


def holes(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each host hole in the file, by SEEK_HOLE/SEEK_DATA."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= end:
                break
            try:
                pos = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:  # ENXIO: a hole up to the end
                pos = end
            out.append((hole, pos))
    return out


def is_hole(path: Path, start: int, length: int) -> bool:
    return any(lo <= start and start + length <= hi for lo, hi in holes(path))


def header_fields(path: Path) -> tuple[int, int, int]:
    """(features, compat_features, autoclear_features)."""
    h = HEADER.unpack_from(path.read_bytes())
    return h[4], h[5], h[6]


# -- the corpus itself ----------------------------------------------------------------------


def test_corpus_files_are_the_recipes() -> None:
    """Every file in tests/data is a recipe's, every recipe has an expectation here, all small."""
    on_disk = {p.name for p in DATA.iterdir() if p.is_file()} - {"README.md", "make_corpus.py"}
    assert on_disk == {c.name for c in make_corpus.CASES}
    assert set(EXPECT) == set(CORPUS)
    total = sum((DATA / name).stat().st_size for name in on_disk)
    assert total < 2 * M, total
    assert all((DATA / name).stat().st_size <= 64 * K for name in on_disk)


def test_readme_is_the_recipes() -> None:
    """README.md is what the generator renders: every file with the exact commands that made it."""
    assert (DATA / "README.md").read_text() == make_corpus.render_readme()


@pytest.mark.interop
def test_corpus_regenerates_byte_identically(tmp_path: Path) -> None:
    version = run(["qemu-img", "--version"]).stdout.split()[2]
    if not version.startswith(make_corpus.QEMU_VERSION + "."):
        pytest.skip(f"the corpus was made with QEMU {make_corpus.QEMU_VERSION}, this is {version}")
    make_corpus.make(tmp_path)
    for case in make_corpus.CASES:
        fresh, committed = (tmp_path / case.name).read_bytes(), (DATA / case.name).read_bytes()
        assert fresh == committed, f"{case.name} differs from a fresh run of its recipe"


def readme_recipes() -> dict[str, str]:
    """File name → the ```sh block under its ``## `name` `` heading in README.md."""
    recipes: dict[str, str] = {}
    name = ""
    lines = iter((DATA / "README.md").read_text().splitlines())
    for line in lines:
        if line.startswith("## `"):
            name = line[4:-1]
        elif line == "```sh":
            recipes[name] = "\n".join(iter(lambda: next(lines), "```"))
    return recipes


@pytest.mark.interop
def test_readme_commands_make_the_same_files(tmp_path: Path) -> None:
    """Run README.md's recipes as a shell script: they make the committed files, byte for byte."""
    recipes = readme_recipes()
    assert list(recipes) == [c.name for c in make_corpus.CASES]
    script = "set -e\nulimit -c 0\n" + "\n".join(recipes.values()) + "\n"
    proc = subprocess.run(["sh", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    for name in recipes:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


# -- (a) check -------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("name", CORPUS)
def test_check_matches_qemu(name: str, tmp_path: Path) -> None:
    path = copy_case(name, tmp_path)
    before = path.read_bytes()
    for output in ("json", "human"):
        ref = qemu_img("check", "-f", "qed", f"--output={output}", path, check=False)
        code, out, err = ours("check", f"--output={output}", path)
        assert (code, out, err) == (ref.returncode, ref.stdout, ""), f"--output={output}"
    assert path.read_bytes() == before


# -- (b) -r all ------------------------------------------------------------------------------


@dataclass
class Repaired:
    unrepaired: Path
    qemu: Path  # copy A, after qemu-img check -r all
    ours: Path  # copy B, after qednbd check -r all
    ours_code: int


def repair_both(name: str, tmp_path: Path, mode: str = "all") -> Repaired:
    original = copy_case(name, tmp_path / "orig")
    a, b = copy_case(name, tmp_path / "qemu"), copy_case(name, tmp_path / "ours")
    qemu_img("check", "-f", "qed", "-r", mode, a, check=False)
    code, _, err = ours("check", "-r", mode, b)
    assert err == "", err
    return Repaired(original, a, b, code)


@pytest.mark.interop
@pytest.mark.parametrize("name", CORPUS)
def test_repair_all(name: str, tmp_path: Path) -> None:
    expect = EXPECT[name]
    r = repair_both(name, tmp_path)
    view = view_of_qemu_readable(r.unrepaired)

    # qemu-img finds no corruption after ours; leaks only where we punched interior holes
    code, fields = qemu_check(r.ours)
    assert "corruptions" not in fields and fields["check-errors"] == 0, fields
    assert code in (0, 3) and code == r.ours_code, (code, r.ours_code, fields)
    assert not read_features(r.ours) & F_NEED_CHECK
    # the header's other feature words as qemu-img leaves them (compat kept, autoclear cleared)
    assert header_fields(r.ours)[1:] == header_fields(r.qemu)[1:]

    qemu_code, qemu_fields = qemu_check(r.qemu)
    assert ("corruptions" not in qemu_fields) == expect.qemu_repairs, qemu_fields

    # what ours reads: the unrepaired file's view, with unreadable (invalid) entries and
    # entries into metadata reading as unallocated
    ours_read = convert(r.ours)
    assert ours_read is not None
    backing = clusters((DATA / "backing.raw").read_bytes()) if "backing" in name else []
    expected = [
        (backing[g] if g < len(backing) else bytes(CS)) if v is None or g in expect.cleared else v
        for g, v in enumerate(view)
    ]
    assert differing(clusters(ours_read), expected) == []
    for g in expect.cleared:  # beyond QEMU: no guest read serves metadata
        assert ours_read[g * CS : (g + 1) * CS] == bytes(CS)

    if expect.qemu_repairs:
        assert convert(r.qemu) == ours_read
    if expect.same_bytes:
        assert r.ours.read_bytes() == r.qemu.read_bytes()
    if name in DUPLICATES_ONLY:  # every guest offset reads what it read before the repair
        assert ours_read == convert(r.unrepaired) is not None
        assert qemu_code == 2  # which QEMU cannot repair


# -- (c) leaks -------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["all", "leaks"])
@pytest.mark.parametrize("name", CORPUS)
def test_repair_gives_leaked_space_back(name: str, mode: str, tmp_path: Path) -> None:
    r = repair_both(name, tmp_path, mode)
    _, after = our_check(r.ours)
    size = r.ours.stat().st_size
    assert size % CS == 0, "a partial cluster at the end is given back too"
    leaked_after = after.get("leaks", 0)
    assert isinstance(leaked_after, int)
    # every leak left is an interior host hole, so the last cluster of the file is in use
    with QedImage.open(str(r.ours), read_only=True, open_backing=False) as image:
        report = check(image)
    leak_runs = [(f.value, f.count) for f in report.findings if f.kind == FindingKind.LEAK]
    assert sum(n for _, n in leak_runs) == leaked_after == report.leaks
    if name == "l2-into-other-l2.qed" and mode == "leaks":
        # 0x8000 is L2#1's data cluster: counted as leaked only because the check does not
        # read a table it finds shared (with guest 8k's entry); it must keep its data
        assert leak_runs == [(0x8000, 1)] and not is_hole(r.ours, 0x8000, CS)
        leak_runs = []
    for offset, n in leak_runs:
        assert offset + n * CS < size, f"leaked clusters at the end of the file: {leak_runs}"
        assert is_hole(r.ours, offset, n * CS), f"leaked clusters not punched: {leak_runs}, {holes(r.ours)}"


@pytest.mark.interop
def test_leak_at_end_is_truncated_interior_is_punched(tmp_path: Path) -> None:
    """leak-interior-and-end: 0x6000 leaked inside, one cluster and 1000 bytes after 0xb000."""
    r = repair_both("leak-interior-and-end.qed", tmp_path)
    assert r.ours.stat().st_size == 0xB000
    assert is_hole(r.ours, 0x6000, CS)
    assert not is_hole(r.ours, 0x7000, CS)
    assert r.ours.stat().st_blocks < r.unrepaired.stat().st_blocks
    assert r.qemu.stat().st_size == 0xB000 + CS + 1000  # QEMU gives nothing back
    code, fields = qemu_check(r.qemu)
    assert (code, fields["leaks"]) == (3, 2)
    code, fields = qemu_check(r.ours)
    assert (code, fields["leaks"]) == (3, 1)  # the hole still counts: the file keeps its length there


# -- (d) twice -------------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["all", "leaks"])
@pytest.mark.parametrize("name", CORPUS)
def test_second_repair_changes_nothing(name: str, mode: str, tmp_path: Path) -> None:
    path = copy_case(name, tmp_path)
    first, _, _ = ours("check", "-r", mode, path)
    after_first = path.read_bytes(), holes(path)
    second, out, err = ours("check", "-r", mode, path)
    assert (path.read_bytes(), holes(path)) == after_first
    assert second == first
    assert err == "" and "repaired" not in out, out


# -- (e) -r leaks ----------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("name", CORPUS)
def test_repair_leaks_clears_what_qemu_clears_and_no_more(name: str, tmp_path: Path) -> None:
    """``-r leaks``: every guest cluster reads what it reads after qemu-img's repair, and
    the duplicates and entries into metadata that qemu-img leaves are left (and still counted)."""
    r = repair_both(name, tmp_path, "leaks")
    _, qemu_fields = qemu_check(r.qemu)
    _, fields = qemu_check(r.ours)
    assert fields.get("corruptions") == qemu_fields.get("corruptions")
    assert fields["allocated-clusters"] == qemu_fields["allocated-clusters"]
    assert differing(guest_view(r.ours), guest_view(r.qemu)) == []
    features, *others = header_fields(r.ours)
    qemu_features, *qemu_others = header_fields(r.qemu)
    assert others == qemu_others
    if fields.get("corruptions") and read_features(r.unrepaired) & F_NEED_CHECK:
        # beyond QEMU: a dirty image stays dirty while damage is left (qemu-img's close clears
        # NEED_CHECK whatever its check found, qed.md §6.2)
        assert (features, qemu_features) == (F_NEED_CHECK, 0)
    else:
        assert features == qemu_features
    our_code, our_fields = our_check(r.ours)
    assert our_fields.get("corruptions") == fields.get("corruptions")
    assert our_code == r.ours_code
    if not qemu_fields.get("corruptions"):
        assert r.ours_code in (0, 3)


# -- (f) output ------------------------------------------------------------------------------

INVALID_ONLY = ("l2-past-eof.qed", "header-size-2-into-header.qed", "dirty-clean.qed", "truncated-data.qed")


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["all", "leaks"])
@pytest.mark.parametrize("name", INVALID_ONLY)
def test_repair_output_is_qemu_img_s(name: str, mode: str, tmp_path: Path) -> None:
    """Where both repairs do the same thing, the human and JSON outputs are qemu-img's, byte for byte."""
    for output in ("human", "json"):
        a = copy_case(name, tmp_path / f"qemu-{output}")
        b = copy_case(name, tmp_path / f"ours-{output}")
        ref = qemu_img("check", "-f", "qed", "-r", mode, f"--output={output}", a, check=False)
        proc = qednbd("check", "-r", mode, f"--output={output}", b)
        assert proc.stderr == ""
        assert proc.returncode == ref.returncode
        assert proc.stdout == ref.stdout.replace(str(a), str(b))
    if name == "l2-past-eof.qed":
        assert '"corruptions-fixed": 1' in proc.stdout


@pytest.mark.interop
def test_repair_output_shape_with_leaks(tmp_path: Path) -> None:
    """Leaks given back show as ``leaks-fixed`` (qemu-img never fixes any); the wording is qemu-img's."""
    path = copy_case("dirty-damaged.qed", tmp_path)  # 1 invalid offset, 2 leaks (one interior)
    proc = qednbd("check", "-r", "all", path)
    assert proc.returncode == 3
    assert proc.stdout == (
        "The following inconsistencies were found and repaired:\n\n"
        "    1 leaked clusters\n    1 corruptions\n\n"
        "Double checking the fixed image now...\n\n"
        "1 leaked clusters were found on the image.\n"
        "This means waste of disk space, but no harm to data.\n"
        "3/2048 = 0.15% allocated, 33.33% fragmented, 0.00% compressed clusters\n"
    )
    path = copy_case("dirty-damaged.qed", tmp_path / "json")
    proc = qednbd("check", "-r", "all", "--output=json", path)
    fields = json.loads(proc.stdout)
    assert (fields["corruptions-fixed"], fields["leaks-fixed"], fields["leaks"]) == (1, 1, 1)
    assert "corruptions" not in fields
    ref_path = copy_case("dirty-damaged.qed", tmp_path / "qemu")
    _, ref = qemu_check(ref_path, "-r", "all")
    assert (ref["corruptions-fixed"], ref.get("leaks-fixed"), ref["leaks"]) == (1, None, 2)
    assert set(fields) == set(ref) | {"leaks-fixed"}
