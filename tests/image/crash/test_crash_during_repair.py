"""Crashes during repair, and after it (issue 3, "Crash consistency, proved").

Damaged, dirty images — states from the crash enumeration whose recovery changes more
than the dirty bit, and images damaged by hand (invalid offsets, duplicates, entries into
metadata, leaks, a truncated file) — are repaired on a :class:`crashfs.CrashStorage`; the
repair's own I/O is enumerated like a workload's (every prefix, subset, torn write, size
before data, after every logged I/O). Each crash state must open read-write (the open
repairs it again), pass C1 and C7, and read, at every guest offset, exactly what the
damaged image reads after a clean, uninterrupted repair.

Then a recovered state is used as it would be by the server, and the crash states of new
workloads on it are checked as on a fresh image (C1–C7).
"""

from __future__ import annotations

import struct
import time

import crashfs
import pytest
from crashfs import CLUSTER, SOAK, Enumerator, Env, RepairCrashChecker, Start

from qednbd.qed import format as fmt

# -- damaged images ---------------------------------------------------------------------------

_U64 = struct.Struct("<Q")


def u64(data: bytes | bytearray, offset: int) -> int:
    return int(_U64.unpack_from(data, offset)[0])


class Layout:
    """A populated image (a data cluster in every L2 table) and where things are in it."""

    def __init__(self, env: Env) -> None:
        names = ("W0", "WPART", "WSPAN", "WL2", "W3", "FLUSH")
        trace = crashfs.run_workload(env, [env.menu[n] for n in names])
        assert trace.error is None
        last = trace.log[-1]
        assert isinstance(last, crashfs.Barrier)
        self.data = last.durable
        h = fmt.Header.decode(self.data[: fmt.HEADER_BYTES])
        self.l1 = h.l1_table_offset
        self.table_bytes = h.cluster_size * h.table_size
        self.tables = [u64(self.data, self.l1 + 8 * i) for i in range(3)]
        assert all(self.tables), self.tables

    def l1_entry(self, i: int) -> int:
        return self.l1 + 8 * i

    def l2_entry(self, table: int, i: int) -> int:
        return self.tables[table] + 8 * i

    def value(self, offset: int) -> int:
        return u64(self.data, offset)


def damage(layout: Layout, name: str) -> bytes:
    """The populated image with one kind of damage (or several), NEED_CHECK set."""
    buf = bytearray(layout.data)
    end = len(buf)
    cluster0 = layout.value(layout.l2_entry(0, 0))
    cluster1 = layout.value(layout.l2_entry(0, 1))

    def poke(offset: int, value: int) -> None:
        _U64.pack_into(buf, offset, value)

    def apply(kind: str) -> None:
        if kind == "l2-past-eof":
            poke(layout.l2_entry(0, 5), end + 8 * CLUSTER)
        elif kind == "l2-misaligned":
            poke(layout.l2_entry(0, 0), cluster0 + 512)
        elif kind == "l1-past-eof":
            poke(layout.l1_entry(1), end + 16 * CLUSTER)
        elif kind == "l1-misaligned":
            poke(layout.l1_entry(2), layout.tables[2] + 512)
        elif kind == "l2-duplicate":
            poke(layout.l2_entry(0, 6), cluster0)
        elif kind == "l2-duplicate-across-tables":
            poke(layout.l2_entry(1, 5), cluster1)
        elif kind == "l1-shared-table":
            poke(layout.l1_entry(2), layout.tables[0])
        elif kind == "l2-into-l1":
            poke(layout.l2_entry(0, 7), layout.l1)
        elif kind == "l2-into-l2":
            poke(layout.l2_entry(0, 8), layout.tables[1])
        elif kind == "l1-into-l1":
            poke(layout.l1_entry(2), layout.l1)
        elif kind == "l1-into-data":
            poke(layout.l1_entry(2), cluster0)
        elif kind == "leak-tail":
            buf.extend(crashfs.stamp(99, 0, 3 * CLUSTER))
        elif kind == "leak-interior":
            poke(layout.l2_entry(0, 1), 0)
        elif kind == "truncated-mid-cluster":
            del buf[end - CLUSTER // 2 :]
        else:
            raise ValueError(kind)

    for kind in name.split("+"):
        apply(kind)
    features = u64(buf, 16)
    _U64.pack_into(buf, 16, features | fmt.F_NEED_CHECK)
    return bytes(buf)


DAMAGE = (
    "l2-past-eof",
    "l2-misaligned",
    "l1-past-eof",
    "l1-misaligned",
    "l2-duplicate",
    "l2-duplicate-across-tables",
    "l1-shared-table",
    "l2-into-l1",
    "l2-into-l2",
    "l1-into-l1",
    "l1-into-data",
    "leak-tail",
    "leak-interior",
    "truncated-mid-cluster",
    "l2-past-eof+l2-duplicate+l2-into-l1+leak-tail+l1-shared-table",
    "l2-duplicate-across-tables+l1-misaligned+leak-tail+l2-misaligned",
)


_POOL: dict[str, dict[tuple[bool, ...], list[tuple[str, bytes]]]] = {}


def enumerated_damage(env: Env, limit_per_kind: int) -> list[tuple[str, bytes]]:
    """Dirty states from the crash enumeration whose repair does real work, a few of each
    kind of work (entries cleared, clusters truncated, clusters punched)."""
    pool = _POOL.get(env.path)
    if pool is None:
        pool = _POOL[env.path] = {}
        en = Enumerator(env, qemu_max=0, keep_dirty=100_000)
        with crashfs.quiet_repair_log():
            for seq in crashfs.plan([(("W0", "WPART", "WL2", "ZODD", "TRIM", "IDLE"), 2)]):
                en.run([env.menu[n] for n in seq])
        assert not en.stats.violations, crashfs.violations_text(en.stats)
        seen: set[bytes] = set()
        for label, data in en.dirty_states:
            if data in seen:
                continue
            seen.add(data)
            r = crashfs.clean_repair(env, data).result
            kind = (bool(r.entries_cleared), bool(r.clusters_truncated), bool(r.clusters_punched))
            group = pool.setdefault(kind, [])
            if len(group) < 100:
                group.append((label, data))
    assert any(k[1] for k in pool), pool.keys()  # at least leaked tails to truncate
    if not env.cfg.backing:  # an L2 update durable before its data (flushed first with a backing file)
        assert any(k[0] for k in pool), pool.keys()
    return [item for kind in sorted(pool) for item in pool[kind][:limit_per_kind]]


# -- the tests ---------------------------------------------------------------------------------------


def _check_repairs(
    request, env: Env, cases: list[tuple[str, bytes]], label: str
) -> tuple[crashfs.Stats, list[crashfs.RepairRun | None]]:
    checker = RepairCrashChecker(env, qemu_every=50, qemu_max=10)
    began = time.monotonic()
    with crashfs.quiet_repair_log():
        refs = [checker.run(name, data) for name, data in cases]
    stats = checker.stats
    stats.seconds = time.monotonic() - began
    crashfs.report(request, "  " + stats.line(f"{label}, {env.cfg.name}"))
    request.node.user_properties.append(("crash_states_distinct", stats.distinct))
    assert not stats.violations, crashfs.violations_text(stats)
    assert all(ref is not None and ref.result.changed for ref in refs)
    return stats, refs


@pytest.mark.interop  # samples go through qemu-img check
@pytest.mark.parametrize("cfg", crashfs.CONFIGS, ids=lambda c: c.name)
def test_crash_during_repair_of_hand_damaged_images(cfg, envs, request):
    env = envs[cfg.name]
    layout = Layout(env)
    cases = [(name, damage(layout, name)) for name in DAMAGE]
    stats, refs = _check_repairs(request, env, cases, "crashes during repair of damaged images")
    assert stats.distinct >= 10 * len(DAMAGE)
    for (name, _), ref in zip(cases, refs, strict=True):  # the phases the enumeration went through
        assert ref is not None
        r = ref.result
        assert r.entries_cleared or "duplicate" in name or "leak" in name or "shared" in name, name
        assert r.entries_redirected or "duplicate" not in name, name
        assert r.tables_copied or "shared" not in name, name
        assert r.clusters_truncated or "tail" not in name, name
        assert r.clusters_punched or "interior" not in name, name


@pytest.mark.interop  # samples go through qemu-img check
@pytest.mark.parametrize("cfg", crashfs.CONFIGS, ids=lambda c: c.name)
def test_crash_during_recovery_of_crash_states(cfg, envs, request):
    env = envs[cfg.name]
    cases = enumerated_damage(env, 60 if SOAK else 12)
    stats, _ = _check_repairs(request, env, cases, "crashes during recovery of crash states")
    assert stats.distinct > len(cases)


@pytest.mark.parametrize("cfg", crashfs.CONFIGS, ids=lambda c: c.name)
def test_crash_after_recovery(cfg, envs, request):
    """A recovered image is used again: new workloads' crash states are checked as on a
    fresh image (the model starts from what the recovered image reads)."""
    env = envs[cfg.name]
    starts: list[Start] = []
    for name, data in enumerated_damage(env, 4 if SOAK else 2)[: 12 if SOAK else 4]:
        res = crashfs.open_and_check(env, data, keep_final=True)
        assert res.error is None, res.error
        starts.append(Start(f"recovered({name})", res.final, res.diff))
    layout = Layout(env)
    for name in ("l2-duplicate", "l1-shared-table+leak-interior"):
        res = crashfs.open_and_check(env, damage(layout, name), keep_final=True)
        assert res.error is None, res.error
        starts.append(Start(f"recovered({name})", res.final, res.diff))
    menu = ("W0", "WL2", "W3", "ZODD", "FLUSH", "IDLE") if SOAK else ("W0", "WL2", "ZODD", "IDLE")
    en = Enumerator(env, qemu_max=0)
    began = time.monotonic()
    with crashfs.quiet_repair_log():
        for start in starts:
            en.run([], points="all", start=start)
            for seq in crashfs.plan([(menu, 2)]):
                en.run([env.menu[n] for n in seq], start=start)
    en.stats.seconds = time.monotonic() - began
    crashfs.report(request, "  " + en.stats.line(f"crash states after recovery, {cfg.name}"))
    assert not en.stats.violations, crashfs.violations_text(en.stats)
    assert en.stats.distinct >= 100
