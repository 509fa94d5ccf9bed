"""deploy/Containerfile: hadolint finds nothing, and the file has the shape the deployment relies
on (the container build itself runs in test_container.py)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from deploykit import DEPLOY, IMAGE_UID, tool

CONTAINERFILE = DEPLOY / "Containerfile"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [tool("hadolint"), "--no-color", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_is_clean() -> None:
    r = hadolint(CONTAINERFILE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "", r.stdout


def test_hadolint_has_teeth(tmp_path: Path) -> None:
    """The linter really runs its rules (a bad file fails), so a clean result means something."""
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN apt-get update && apt-get install python3\n")
    r = hadolint(bad)
    assert r.returncode != 0
    assert "DL3006" in r.stdout  # untagged image
    assert "DL3015" in r.stdout  # no --no-install-recommends


def test_shape() -> None:
    ins = instructions()
    froms = [args for word, args in ins if word == "FROM"]
    assert [f.split()[-1] for f in froms] == ["base", "build", "runtime"]  # multi-stage
    last_user = [args for word, args in ins if word == "USER"][-1]
    assert last_user == f"{IMAGE_UID}:{IMAGE_UID}"  # numeric and not root: runAsNonRoot can check it
    assert ("VOLUME", '["/var/lib/qednbd"]') in ins
    assert ("EXPOSE", "10809") in ins
    entrypoint = json.loads(next(args for word, args in ins if word == "ENTRYPOINT"))
    assert entrypoint == ["qednbd", "serve", "--config", "/etc/qednbd/qednbd.toml"]
    healthcheck = next(args for word, args in ins if word == "HEALTHCHECK")
    assert "/usr/local/bin/qednbd-healthcheck" in healthcheck
    # The runtime stage takes the venv from the build stage, not the sources or pip.
    runtime = ins[[i for i, (word, _) in enumerate(ins) if word == "FROM"][-1] :]
    assert ("COPY", "--from=build /opt/qednbd /opt/qednbd") in runtime
    assert not any(word == "RUN" and "pip" in args for word, args in runtime)


def test_ignore_file_keeps_the_context_small() -> None:
    """Only what the COPY lines need goes into the build context."""
    lines = [
        line.strip()
        for line in (DEPLOY / "Containerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    kept = {line[1:] for line in lines if line.startswith("!")}
    copied = set()
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from"):
            copied.update(args.split()[:-1])
    assert copied == kept
