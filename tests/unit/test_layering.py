"""The layering rules of DESIGN.md, enforced by reading every module under ``qednbd/`` with ``ast``.

* ``qednbd.nbd`` and ``qednbd.qed`` never import each other; they meet in ``export.py``.
* Only ``qednbd/server.py`` imports ``asyncio``, ``socket`` or ``ssl``.
* Only ``qednbd/qed/storage.py`` touches file descriptors with ``os.pread``/``pwrite``/``fsync``/...
* Only ``qednbd/qed/locking.py`` imports ``fcntl`` (image locks; storage.py calls it at open).
* Only ``qednbd/cli.py`` reads ``sys.argv``, calls ``sys.exit`` or configures logging handlers.

Each checker takes source text and returns ``(line, message)`` pairs, so the self-tests at the end
can prove that each one catches a violation.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = REPO_ROOT / "qednbd"

NETWORK_MODULES = frozenset({"asyncio", "socket", "ssl"})
FD_CALLS = frozenset({"pread", "pwrite", "fsync", "fdatasync", "preadv", "pwritev"})
OS_MODULES = frozenset({"os", "posix"})  # posix is what os re-exports these from
SYS_ONLY_IN_CLI = frozenset({"argv", "exit"})
LOGGING_ONLY_IN_CLI = frozenset({"basicConfig"})

Finding = tuple[int, str]
Checker = Callable[[str, str, bool], list[Finding]]  # (source, module, is_package)


def module_name(path: Path) -> str:
    """``qednbd/qed/image.py`` → ``qednbd.qed.image``; ``qednbd/qed/__init__.py`` → ``qednbd.qed``."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def imported_modules(tree: ast.Module, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """Every module an ``import`` statement may bind, absolute, with its line.

    ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (``c`` may be a submodule).
    Relative imports are resolved against ``module``.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = _package_of(module, is_package).split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def _first_per_line(findings: Iterator[Finding]) -> list[Finding]:
    """One finding per line: ``from a import b`` would otherwise report both ``a`` and ``a.b``."""
    by_line: dict[int, str] = {}
    for line, message in findings:
        by_line.setdefault(line, message)
    return sorted(by_line.items())


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _aliases_of(tree: ast.Module, modules: frozenset[str]) -> set[str]:
    """Local names bound to one of ``modules`` by ``import m`` / ``import m as x``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    names.add(alias.asname or alias.name)
    return names


def _attribute_uses(
    tree: ast.Module, modules: frozenset[str], attrs: frozenset[str]
) -> Iterator[tuple[int, str]]:
    """``m.attr``, ``getattr(m, "attr")`` and ``from m import attr`` for ``m`` in ``modules``."""
    local = _aliases_of(tree, modules)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in local
            and node.attr in attrs
        ):
            yield node.lineno, f"{node.value.id}.{node.attr}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in local
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in attrs
        ):
            yield node.lineno, f"getattr({node.args[0].id}, {node.args[1].value!r})"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            for alias in node.names:
                if alias.name in attrs:
                    yield node.lineno, f"from {node.module} import {alias.name}"


# --- the checkers: (source, module name) -> findings -------------------------------------------


def check_nbd_qed_separation(source: str, module: str, is_package: bool = False) -> list[Finding]:
    """``qednbd.nbd.*`` must not import ``qednbd.qed``, nor the reverse."""
    if _within(module, "qednbd.nbd"):
        own, other = "qednbd.nbd", "qednbd.qed"
    else:
        own, other = "qednbd.qed", "qednbd.nbd"
    if not _within(module, own):
        return []
    tree = ast.parse(source)
    return _first_per_line(
        (line, f"{own} imports {name}")
        for line, name in imported_modules(tree, module, is_package)
        if _within(name, other)
    )


def check_network_imports(source: str, module: str, is_package: bool = False) -> list[Finding]:
    """``import asyncio`` / ``socket`` / ``ssl`` (or any submodule of them)."""
    tree = ast.parse(source)
    return _first_per_line(
        (line, f"imports {name}")
        for line, name in imported_modules(tree, module, is_package)
        if name.partition(".")[0] in NETWORK_MODULES
    )


def check_lock_imports(source: str, module: str, is_package: bool = False) -> list[Finding]:
    """``import fcntl``: image locks are QEMU's protocol, kept in one place."""
    tree = ast.parse(source)
    return _first_per_line(
        (line, f"imports {name}")
        for line, name in imported_modules(tree, module, is_package)
        if name == "fcntl"
    )


def check_fd_calls(source: str, module: str, is_package: bool = False) -> list[Finding]:
    """``os.pread`` and friends: file-descriptor I/O belongs to ``qed/storage.py``."""
    tree = ast.parse(source)
    return [(line, f"uses {what}") for line, what in _attribute_uses(tree, OS_MODULES, FD_CALLS)]


def check_process_control(source: str, module: str, is_package: bool = False) -> list[Finding]:
    """``sys.argv``, ``sys.exit``, ``logging.basicConfig`` and ``<logger>.addHandler(...)``."""
    tree = ast.parse(source)
    findings = [
        (line, f"uses {what}") for line, what in _attribute_uses(tree, frozenset({"sys"}), SYS_ONLY_IN_CLI)
    ]
    findings += [
        (line, f"uses {what}")
        for line, what in _attribute_uses(tree, frozenset({"logging"}), LOGGING_ONLY_IN_CLI)
    ]
    findings += [
        (node.lineno, "calls .addHandler()")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "addHandler"
    ]
    return sorted(findings)


# --- applying them to the package ---------------------------------------------------------------


def package_modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def violations(checker: Checker, allowed: set[str]) -> list[str]:
    """``path:line: message`` for every finding outside the ``allowed`` files (repo-relative)."""
    out = []
    for path in package_modules():
        rel = path.relative_to(REPO_ROOT).as_posix()
        if rel in allowed:
            continue
        source = path.read_text(encoding="utf-8")
        is_package = path.name == "__init__.py"
        for line, message in checker(source, module_name(path), is_package):
            out.append(f"{rel}:{line}: {message}")
    return out


def test_package_is_found() -> None:
    # Guards the rules below against passing vacuously on an empty or moved package.
    rels = {p.relative_to(REPO_ROOT).as_posix() for p in package_modules()}
    assert "qednbd/__init__.py" in rels


def test_nbd_and_qed_do_not_import_each_other() -> None:
    found = violations(check_nbd_qed_separation, allowed=set())
    assert not found, "nbd/ and qed/ must meet only in export.py:\n" + "\n".join(found)


def test_only_server_does_networking() -> None:
    found = violations(check_network_imports, allowed={"qednbd/server.py"})
    assert not found, "only qednbd/server.py may import asyncio/socket/ssl:\n" + "\n".join(found)


def test_only_storage_touches_file_descriptors() -> None:
    found = violations(check_fd_calls, allowed={"qednbd/qed/storage.py"})
    assert not found, "only qednbd/qed/storage.py may call os.pread/pwrite/fsync/...:\n" + "\n".join(found)


def test_only_locking_takes_locks() -> None:
    found = violations(check_lock_imports, allowed={"qednbd/qed/locking.py"})
    assert not found, "only qednbd/qed/locking.py may import fcntl:\n" + "\n".join(found)


def test_only_cli_controls_the_process() -> None:
    found = violations(check_process_control, allowed={"qednbd/cli.py"})
    assert not found, (
        "only qednbd/cli.py may read sys.argv, call sys.exit or configure logging:\n" + "\n".join(found)
    )


# --- self-tests: each checker must catch a planted violation and pass clean code ----------------

BAD: list[tuple[Checker, str, str, int]] = [
    (check_nbd_qed_separation, "qednbd.qed.image", "import os\nfrom qednbd.nbd import constants\n", 2),
    (check_nbd_qed_separation, "qednbd.qed.image", "from ..nbd.constants import Cmd\n", 1),
    (check_nbd_qed_separation, "qednbd.nbd.handshake", "\nimport qednbd.qed.format as f\n", 2),
    (check_nbd_qed_separation, "qednbd.nbd.handshake", "from qednbd import qed\n", 1),
    (check_network_imports, "qednbd.export", "import json\nimport asyncio\n", 2),
    (check_network_imports, "qednbd.export", "from socket import socketpair\n", 1),
    (check_network_imports, "qednbd.export", "def f():\n    import ssl\n", 2),
    (check_lock_imports, "qednbd.qed.storage", "import os\nimport fcntl\n", 2),
    (check_lock_imports, "qednbd.qed.image", "from fcntl import F_OFD_SETLK\n", 1),
    (check_fd_calls, "qednbd.qed.image", "import os\n\nos.pwrite(fd, b'', 0)\n", 3),
    (check_fd_calls, "qednbd.qed.image", "import os as _os\n_os.fsync(3)\n", 2),
    (check_fd_calls, "qednbd.qed.image", "from os import preadv\n", 1),
    (check_fd_calls, "qednbd.qed.image", "import os\nf = getattr(os, 'fdatasync')\n", 2),
    (check_process_control, "qednbd.server", "import sys\nprint(sys.argv)\n", 2),
    (check_process_control, "qednbd.server", "import sys\n\n\nsys.exit(1)\n", 4),
    (check_process_control, "qednbd.server", "from sys import exit\n", 1),
    (check_process_control, "qednbd.server", "import logging\nlogging.basicConfig()\n", 2),
    (check_process_control, "qednbd.server", "import logging\nlogging.getLogger().addHandler(h)\n", 2),
]

GOOD: list[tuple[Checker, str, str]] = [
    (check_nbd_qed_separation, "qednbd.export", "from qednbd.nbd import constants\nfrom .qed import image\n"),
    (check_nbd_qed_separation, "qednbd.qed.image", "from qednbd.qed import format\nfrom . import tables\n"),
    (check_network_imports, "qednbd.export", "import asyncore_like\nimport sslib\n"),
    (check_lock_imports, "qednbd.qed.storage", "from qednbd.qed import locking\nimport fcntlx\n"),
    (check_fd_calls, "qednbd.qed.image", "import os\nos.path.join('a')\nstorage.pread(0, 1)\n"),
    (check_process_control, "qednbd.server", "import sys\nsys.stderr.write('x')\nself.exit()\n"),
    (check_process_control, "qednbd.server", "import logging\nlog = logging.getLogger(__name__)\n"),
]


def _ids(checkers: list[Checker]) -> list[str]:
    return [f"{c.__name__.removeprefix('check_')}-{i}" for i, c in enumerate(checkers)]


@pytest.mark.parametrize(("checker", "module", "source", "line"), BAD, ids=_ids([c[0] for c in BAD]))
def test_checker_catches_violation(checker: Checker, module: str, source: str, line: int) -> None:
    found = checker(source, module, False)
    assert [ln for ln, _ in found] == [line], found


@pytest.mark.parametrize(("checker", "module", "source"), GOOD, ids=_ids([c[0] for c in GOOD]))
def test_checker_passes_clean_code(checker: Checker, module: str, source: str) -> None:
    assert checker(source, module, False) == []


def test_relative_import_in_package_init_resolves_from_the_package() -> None:
    # In qednbd/qed/__init__.py, "from . import x" means qednbd.qed.x and "from .. import nbd"
    # means qednbd.nbd.
    clean = "from . import format\nfrom .tables import L2Cache\n"
    assert check_nbd_qed_separation(clean, "qednbd.qed", True) == []
    found = check_nbd_qed_separation("from . import format\nfrom .. import nbd\n", "qednbd.qed", True)
    assert [ln for ln, _ in found] == [2]
