"""Crash consistency of the QED engine, by enumeration of crash states (issue 3).

Every sequence of up to three ops from a small menu runs on tiny geometries (4 KiB
clusters, table_size 1 and 2, with and without a raw backing file) over a
:class:`crashfs.CrashStorage`; after every logged I/O, every reachable on-disk state
(subsets, prefixes, torn writes, size before data) is opened read-write (which repairs a
dirty image) and must satisfy C1–C7 of reliability.md §1.2. ``crashfs``'s docstring
states the model and the oracle. The harness's own tests come first: the storage model,
the crash-state generator, and, for each invariant, an engine made wrong on purpose
(monkeypatched) whose violation the enumeration must find.

``QEDNBD_CRASH_SOAK=1`` widens the enumeration (all sequences of three ops from the full
menu, four from a small one, more random sequences) for local runs.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import crashfs
import pytest
from crashfs import CORE, FULL, SIZE_ONLY, SOAK, CrashStorage, Enumerator, Env, Op, Write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qednbd.qed import format as fmt
from qednbd.qed import image as image_module

# -- the storage model --------------------------------------------------------------------


def test_reads_see_pending_writes_and_flush_makes_them_durable():
    s = CrashStorage(b"a" * 1024)
    s.pwrite(b"bb", 10)
    s.pwrite(b"cc", 11)
    assert s.pread(4, 9) == b"abcc"
    assert s.durable[10:13] == b"aaa"
    assert [w.seq for w in s.pending] == [0, 1]
    s.flush()
    assert s.durable[9:13] == b"abcc" and not s.pending
    assert isinstance(s.log[-1], crashfs.Barrier) and s.log[-1].durable == bytes(s.durable)


def test_truncate_punch_and_extension_are_pending_ops():
    s = CrashStorage(bytes(1024))
    s.pwrite(b"x" * 100, 2000)  # extends the file, with a hole before the data
    assert s.length() == 2100 and s.pread(10, 1990) == bytes(10)
    assert s.punch_hole(2050, 4096) is True  # never extends the file
    assert s.length() == 2100 and s.pread(60, 2040) == b"x" * 10 + bytes(50)
    s.truncate(1500)
    assert s.length() == 1500 and len(s.durable) == 1024
    assert [type(e).__name__ for e in s.log] == ["Write"] * 3
    assert s.pending[2].is_truncate and s.pending[1].keep_size and s.pending[0].extends


def test_materialized_variants_torn_and_size_only():
    base = bytes(1024)
    w = Write(0, 700, b"y" * 1000, 1000, prev_len=1024)  # host sectors 700|1024|1536|1700
    assert w.cuts() == [324, 836]
    torn = crashfs.materialize(base, [w], [(0, 1)])
    assert torn[700:1024] == b"y" * 324 and len(torn) == 1024
    torn2 = crashfs.materialize(base, [w], [(0, 2)])
    assert len(torn2) == 1536 and torn2[1024:] == b"y" * 512
    size_only = crashfs.materialize(base, [w], [(0, SIZE_ONLY)])
    assert size_only == bytes(1700)
    assert crashfs.materialize(base, [w], [(0, FULL)])[700:] == b"y" * 1000


def test_choices_every_subset_up_to_ten_then_sampled():
    def writes(n: int) -> list[Write]:
        return [Write(i, 512 * i, b"z" * 512, 512, prev_len=1 << 20) for i in range(n)]

    rng = random.Random(1)
    for n in range(1, 11):
        got = list(crashfs.point_choices(writes(n), rng))
        assert len(got) == 1 << (n - 1)  # every subset with the last write; whole sectors
        assert all(c[-1] == (n - 1, FULL) for c in got)
    big = list(crashfs.point_choices(writes(14), rng, samples=16))
    sets = {frozenset(i for i, _ in c) for c in big}
    everything = frozenset(range(14))
    assert {13} in [set(x) for x in sets]  # the last one alone
    assert all(everything - {j} in sets for j in range(13))  # all but one
    assert all(frozenset([*range(j), 13]) in sets for j in range(13))  # prefixes
    assert len(sets) < 1 << 13


def test_stamps_name_their_offset_and_generation():
    data = crashfs.stamp(7, 4096 + 3, 20)
    word = crashfs.stamp(7, 4096 + 8, 8)
    assert data[5:13] == word
    assert crashfs.describe_word(word, 4096 + 8) == "generation 7"
    assert crashfs.describe_word(word, 8192).startswith("C4: stamp of guest offset 0x1008")
    assert crashfs.describe_word(bytes(8), 0) == "zeros"


def test_the_log_replays_to_the_same_file(envs):
    env = envs["ts1-backing"]
    trace = crashfs.run_workload(env, [env.menu[n] for n in ("W0", "WL2", "ZODD", "TRIM", "IDLE")])
    assert trace.error is None
    replay = bytearray(env.template)
    for entry in trace.log:
        if isinstance(entry, Write):
            crashfs.apply_write(replay, entry)
    last = [e for e in trace.log if isinstance(e, crashfs.Barrier)][-1]
    assert bytes(replay) == last.durable


# -- the harness finds what a wrong engine does ----------------------------------------------


def _violations(env: Env, seqs: list[tuple[str, ...]]) -> set[str]:
    en = Enumerator(env, qemu_max=0)
    with crashfs.quiet_repair_log():
        for seq in seqs:
            en.run([env.menu[n] for n in seq], points="all")
    assert en.stats.distinct > 0
    return {v.invariant for v in en.stats.violations}


def test_harness_finds_a_flush_that_does_nothing(envs, monkeypatch):
    monkeypatch.setattr(image_module.QedImage, "flush", lambda self: None)
    assert "C2/C3/C5" in _violations(envs["ts1"], [("W0", "FLUSH"), ("WPART", "FUA")])


def test_harness_finds_tables_updated_without_need_check(envs, monkeypatch):
    monkeypatch.setattr(image_module.QedImage, "_mark_dirty", lambda self: None)
    assert {"C1", "C6"} <= _violations(envs["ts2"], [("W0",), ("ZODD",)])


def test_harness_finds_need_check_cleared_before_the_flush(envs, monkeypatch):
    def clear_first(self: image_module.QedImage) -> None:
        if self.header.need_check and not self.opened_dirty:
            self._write_header(self.header.with_features(self.header.features & ~fmt.F_NEED_CHECK))
        self.storage.flush()

    monkeypatch.setattr(image_module.QedImage, "clear_need_check", clear_first)
    assert "C6" in _violations(envs["ts1"], [("ZODD", "IDLE"), ("W0", "REOPEN")])


def test_harness_finds_backing_data_not_flushed_before_the_l2_update(envs, monkeypatch):
    real = image_module.QedImage._allocating_write

    def skip_first_flush(self, pos, chunk, run):  # the flush between COW data and L2 update
        flush = self.storage.flush
        calls = []

        def once() -> None:
            calls.append(1)
            if len(calls) > 1:
                flush()

        self.storage.flush = once
        try:
            real(self, pos, chunk, run)
        finally:
            del self.storage.flush

    monkeypatch.setattr(image_module.QedImage, "_allocating_write", skip_first_flush)
    assert "C2/C3/C5" in _violations(envs["ts1-backing"], [("FLUSH", "WPART"), ("FLUSH", "ZODD")])


def test_need_check_must_be_durable_before_a_table_update(envs, monkeypatch):
    """reliability.md §1.2 C6 asks whether QEMU's order (NEED_CHECK written, not flushed,
    before the data and the L2 update) is enough. It is not: once the bit was cleared
    (idle timer, close), the next allocation into an existing table can leave an entry
    past EOF with the bit clear. The engine flushes the header first; this shows why."""

    def set_without_flush(self: image_module.QedImage) -> None:
        if not self.header.need_check:
            self._write_header(self.header.with_features(self.header.features | fmt.F_NEED_CHECK))

    monkeypatch.setattr(image_module.QedImage, "set_need_check", set_without_flush)
    assert "C6" in _violations(envs["ts1"], [("W0", "IDLE", "WPART"), ("W0", "REOPEN", "ZODD")])


def test_with_a_backing_file_the_data_flush_alone_keeps_tables_safe(envs, monkeypatch):
    """QEMU sets no NEED_CHECK with a backing file ("the flush before L2 update path
    ensures consistency"). Its reasoning holds here too: without the bit, every crash
    state still passes C1–C7 (only leaks are left, which are harmless)."""
    monkeypatch.setattr(image_module.QedImage, "_mark_dirty", lambda self: None)
    seqs = [("W0", "IDLE", "WPART"), ("WL2", "ZODD"), ("WPART", "WSPAN", "W3"), ("ZL2", "W0")]
    assert _violations(envs["ts2-backing"], seqs) == set()


def test_harness_finds_an_open_that_does_not_recover(envs, monkeypatch):
    monkeypatch.setattr(image_module.QedImage, "_recover", lambda self, progress: None)
    assert "C1" in _violations(envs["ts1"], [("W0",), ("ZODD",)])


def test_harness_finds_reads_of_another_offset(envs, monkeypatch):
    real_recover, real_read = image_module.QedImage._recover, image_module.QedImage.read

    def recover(self, progress):
        real_recover(self, progress)
        self.swapped = True  # after a recovery, this image misreads (below)

    def read(self, pos, length):  # the first two sectors of a read come back swapped
        data = real_read(self, pos, length)
        if getattr(self, "swapped", False) and length >= 1024:
            data = data[512:1024] + data[:512] + data[1024:]
        return data

    monkeypatch.setattr(image_module.QedImage, "_recover", recover)
    monkeypatch.setattr(image_module.QedImage, "read", read)
    assert "C4" in _violations(envs["ts2"], [("W0", "FLUSH")])


# -- the enumeration ----------------------------------------------------------------------------


def _run(
    request,
    tmp_path: Path,
    label: str,
    seqs: list[tuple[str, ...]],
    configs=crashfs.CONFIGS,
    qemu_max: int = 20,
) -> crashfs.Stats:
    jobs = [crashfs.Job(cfg, tmp_path / cfg.name, tuple(seqs), qemu_max=qemu_max) for cfg in configs]
    total = crashfs.Stats()
    per_config = crashfs.run_jobs(jobs)
    for job, stats in zip(jobs, per_config, strict=True):
        crashfs.report(request, "  " + stats.line(job.cfg.name))
        total.add(stats)
    crashfs.report(request, total.line(f"{label} (all configurations)"))
    request.node.user_properties.append(("crash_states_distinct", total.distinct))
    request.node.user_properties.append(("crash_states_passed", total.passed))
    return total


FULL_MENU = tuple(crashfs.menu(crashfs.CONFIGS[0]))


# Three-op sequences where the dirty bit was cleared between two allocations.
AROUND_A_CLEAN_POINT = [
    (a, mid, b)
    for a in ("W0", "WPART", "WL2", "ZODD")
    for mid in ("IDLE", "REOPEN", "FLUSH")
    for b in ("W0", "WPART", "WL2", "ZODD")
]


@pytest.mark.interop  # samples go through qemu-img check
def test_crash_states_default(request, tmp_path):
    """Every sequence of up to two ops from the full menu, and three-op sequences around a
    clean point, every configuration: the CI run's ≥ 10,000 distinct crash states (in two
    processes when there are two cores)."""
    seqs = crashfs.plan([(FULL_MENU, 2)]) + AROUND_A_CLEAN_POINT
    total = _run(request, tmp_path, "default plan (<= 2 ops, 3 around a clean point)", seqs)
    assert not total.violations, crashfs.violations_text(total)
    assert total.distinct >= 10_000
    assert total.qemu_checked >= 20


@pytest.mark.slow
@pytest.mark.interop
def test_crash_states_three_ops(request, tmp_path):
    """Every sequence of up to three ops from the core menu (soak: three from the full
    menu and four from a small one)."""
    if SOAK:
        seqs = crashfs.plan([(FULL_MENU, 3), (("W0", "WL2", "ZODD", "TRIM", "FLUSH", "IDLE"), 4)])
    else:
        seqs = crashfs.plan([(CORE, 3)])
    total = _run(request, tmp_path, "every sequence of <= 3 ops", seqs, qemu_max=60 if SOAK else 20)
    assert not total.violations, crashfs.violations_text(total)
    assert total.distinct >= 25_000
    assert total.qemu_checked >= 20


# -- longer random sequences --------------------------------------------------------------------


def random_ops(cfg: crashfs.Config) -> st.SearchStrategy[list[Op]]:
    fixed = st.sampled_from(list(crashfs.menu(cfg).values()))
    pos = st.one_of(
        st.integers(0, cfg.size // 512 - 1).map(lambda s: s * 512),
        st.integers(0, cfg.size - 1),
        st.sampled_from([cfg.span - 4096, cfg.span - 512, 2 * cfg.span]),  # near the L2 boundaries
    )

    def make(kind: str, p: int, n: int) -> Op:
        n = min(n, cfg.size - p)
        return Op(f"{kind.upper()}@0x{p:x}+{n}", kind, p, n)

    rnd = st.builds(
        make,
        st.sampled_from(["write", "write", "zero", "trim", "fua"]),
        pos,
        st.integers(1, 3 * crashfs.CLUSTER),
    )
    return st.lists(st.one_of(fixed, rnd), min_size=3, max_size=10 if SOAK else 6)


@pytest.mark.parametrize("cfg", crashfs.CONFIGS, ids=lambda c: c.name)
def test_random_longer_sequences(cfg, envs, request):
    """Random sequences (hypothesis) of 3–6 ops at random offsets; crashes after every I/O.
    A violation fails the example, and hypothesis shrinks it to a minimal sequence."""
    env = envs[cfg.name]
    stats = crashfs.Stats()
    began = time.monotonic()

    @settings(
        max_examples=200 if SOAK else 10,
        deadline=None,
        derandomize=not SOAK,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(random_ops(cfg))
    def check(ops: list[Op]) -> None:
        en = Enumerator(env, qemu_max=0)
        with crashfs.quiet_repair_log():
            en.run(ops, points="all")
        stats.add(en.stats)
        assert not en.stats.violations, crashfs.violations_text(en.stats)

    check()
    stats.seconds = time.monotonic() - began
    crashfs.report(request, "  " + stats.line(f"random sequences, {cfg.name}"))
    assert stats.distinct >= 30
