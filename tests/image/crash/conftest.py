"""Shared fixtures of the crash-state tests, and the session summary of their counters."""

from __future__ import annotations

from pathlib import Path

import crashfs
import pytest


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, crashfs.Env]:
    """One :class:`crashfs.Env` per configuration (files in a module-wide temp dir)."""
    root = Path(tmp_path_factory.mktemp("crash"))
    return {cfg.name: crashfs.Env(cfg, root / cfg.name) for cfg in crashfs.CONFIGS}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if crashfs.SUMMARY:
        terminalreporter.section("crash-state enumeration")
        for line in crashfs.SUMMARY:
            terminalreporter.write_line(line)
