"""Torch threads beside the oracle pool: oracle_pool.usable_cores reads a fake /proc and
cgroup tree (the CPU affinity patched, the /proc/stat sample advanced by a patched
sleep), and torch_threads_beside_the_pool combines it with the local workers' threads."""
import argparse

import pytest

import oracle_pool


def self_stat(utime, stime):
    """/proc/self/stat text; the command name holds spaces and a parenthesis."""
    return f"4242 (python3 (x) y) S 1 4242 4242 0 -1 4194304 100 0 0 0 {utime} {stime} 0 0 20 0 3\n"


def stat_lines(cores):
    """/proc/stat text from {cpu: (user, idle, iowait)} jiffies; other fields 0."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]       # the all-CPU line is not read
    for cpu, (user, idle, iowait) in sorted(cores.items()):
        lines.append(f"cpu{cpu} {user} 0 0 {idle} {iowait} 0 0 0 0 0")
    return "\n".join(lines + ["intr 12345", "procs_running 3"]) + "\n"


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """make(cpus, before, after, cgroup=..., files=..., own=...) -> usable_cores() on a
    fake machine: affinity `cpus`, /proc/stat `before`, then `after` once the sample
    sleeps; our own process's utime and stime go from 1000, 200 to those plus `own`."""
    calls = []

    def make(cpus, before, after, cgroup="0::/\n", files=None, own=(0, 0)):
        calls.append(1)                          # a fresh tree for every call
        proc, root = tmp_path / f"{len(calls)}" / "proc", tmp_path / f"{len(calls)}" / "cgroup"
        (proc / "self").mkdir(parents=True)
        (proc / "self" / "cgroup").write_text(cgroup)
        (proc / "stat").write_text(stat_lines(before))
        (proc / "self" / "stat").write_text(self_stat(1000, 200))
        for name, text in (files or {}).items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        monkeypatch.setattr(oracle_pool.os, "sched_getaffinity", lambda pid: set(cpus))
        slept = []
        monkeypatch.setattr(oracle_pool.time, "sleep", lambda s: (
            slept.append(s), (proc / "stat").write_text(stat_lines(after)),
            (proc / "self" / "stat").write_text(self_stat(1000 + own[0], 200 + own[1]))))
        result = oracle_pool.usable_cores(0.05, proc=str(proc), cgroup=str(root))
        assert slept == [0.05]
        return result
    return make


IDLE = (0, 100, 0)    # a core idle for 100 jiffies


def test_idle_cores_are_counted_from_the_sample(fake_machine):
    start = {0: (5000, 9000, 10), 1: (7000, 8000, 20)}

    def after(*deltas):
        return {c: tuple(s + d for s, d in zip(start[c], delta)) for c, delta in
                zip(start, deltas)}
    assert fake_machine([0, 1], start, after(IDLE, IDLE)) == (2, 2)
    assert fake_machine([0, 1], start, after((100, 0, 0), IDLE)) == (2, 1)
    assert fake_machine([0, 1], start, after((100, 0, 0), (100, 0, 0))) == (2, 1)  # at least 1
    assert fake_machine([0, 1], start, after((0, 60, 40), (0, 60, 40))) == (2, 2)  # iowait: idle
    # a core counts when at least 3/4 idle
    assert fake_machine([0, 1], start, after((10, 90, 0), (10, 90, 0))) == (2, 2)  # 1.8 idle
    assert fake_machine([0, 1], start, after((20, 80, 0), (20, 80, 0))) == (2, 1)  # 1.6 idle
    assert fake_machine([0, 1], start, after((0, 100, 0), (30, 40, 30))) == (2, 1)  # 1.7 idle
    assert fake_machine([0, 1], start, after((25, 75, 0), IDLE)) == (2, 2)          # 1.75 idle


def test_our_own_threads_do_not_make_a_core_busy(fake_machine):
    start = {0: (5000, 9000, 10), 1: (7000, 8000, 20)}
    half_busy = {0: (5050, 9050, 10), 1: (7050, 8050, 20)}    # 1 core idle of 2
    assert fake_machine([0, 1], start, half_busy) == (2, 1)
    assert fake_machine([0, 1], start, half_busy, own=(60, 20)) == (2, 2)   # 80 jiffies ours
    assert fake_machine([0, 1], start, half_busy, own=(20, 10)) == (2, 1)   # 30 of 100 busy


def test_only_the_cores_of_the_affinity_count(fake_machine):
    before = {c: (0, 0, 0) for c in range(4)}
    after = {0: IDLE, 1: IDLE, 2: (100, 0, 0), 3: (100, 0, 0)}
    assert fake_machine([0, 1], before, after) == (2, 2)
    assert fake_machine([1, 2], before, after) == (2, 1)
    assert fake_machine([0, 1, 2, 3], before, after) == (4, 2)


def test_no_ticks_in_the_sample_means_no_load_seen(fake_machine):
    same = {0: (10, 10, 0), 1: (10, 10, 0)}
    assert fake_machine([0, 1], same, same) == (2, 2)


def test_the_cgroup_cpu_quota_caps_the_cores(fake_machine):
    before = {c: (0, 0, 0) for c in range(8)}
    after = {c: IDLE for c in range(8)}
    cpus = range(8)
    # cgroup v2, our own cgroup's cpu.max
    assert fake_machine(cpus, before, after, "0::/job\n",
                        {"job/cpu.max": "300000 100000\n"}) == (3, 3)
    assert fake_machine(cpus, before, after, "0::/job\n",
                        {"job/cpu.max": "150000 100000\n"}) == (1, 1)   # 1.5 cores: 1
    assert fake_machine(cpus, before, after, "0::/job\n",
                        {"job/cpu.max": "max 100000\n"}) == (8, 8)
    # a container's own view: its cgroup at the mount's root
    assert fake_machine(cpus, before, after, "0::/\n", {"cpu.max": "200000 100000\n"}) == (2, 2)
    # cgroup v1: cpu.cfs_quota_us / cpu.cfs_period_us (-1: no quota)
    v1 = "4:cpu,cpuacct:/job\n1:name=systemd:/\n"
    assert fake_machine(cpus, before, after, v1, {"cpu/job/cpu.cfs_quota_us": "400000\n",
                                                  "cpu/job/cpu.cfs_period_us": "100000\n"}) \
        == (4, 4)
    assert fake_machine(cpus, before, after, v1, {"cpu/job/cpu.cfs_quota_us": "-1\n",
                                                  "cpu/job/cpu.cfs_period_us": "100000\n"}) \
        == (8, 8)
    # a quota above the affinity: the affinity counts
    assert fake_machine([0, 1], before, after, "0::/\n", {"cpu.max": "400000 100000\n"}) \
        == (2, 2)


def args(n_workers, threads=1, dask=None):
    return argparse.Namespace(n_workers=n_workers, oracle_threads=threads, dask_scheduler=dask)


@pytest.mark.parametrize("allowed, idle, n_workers, threads, pool_idle, dask, expected", [
    (8, 8, 2, 1, False, None, 6),       # the workers' cores reserved, the rest to torch
    (8, 8, 2, 3, False, None, 2),
    (8, 8, 4, 2, False, None, 1),       # workers take every core: still 1 thread
    (8, 8, 2, 1, True, None, 8),        # no job beside the NNP: every core
    (8, 8, 2, 1, False, "tcp://x:1", 8),   # workers elsewhere
    (8, 3, 2, 1, False, None, 3),       # other jobs keep cores busy: the idle ones
    (8, 3, 2, 1, True, None, 3),
    (8, 3, 2, 1, False, "tcp://x:1", 3),
    (2, 1, 0, 1, False, None, 1),       # 2 cores, one busy
    (2, 2, 0, 1, False, None, 2),
])
def test_torch_threads_beside_the_pool(monkeypatch, allowed, idle, n_workers, threads,
                                       pool_idle, dask, expected):
    monkeypatch.setattr(oracle_pool, "usable_cores", lambda: (allowed, idle))
    assert oracle_pool.torch_threads_beside_the_pool(args(n_workers, threads, dask),
                                                 pool_idle=pool_idle) == expected


def test_usable_cores_on_this_machine():
    """The real /proc and cgroup: sane bounds, and a short sample."""
    allowed, idle = oracle_pool.usable_cores(0.02)
    assert 1 <= idle <= allowed <= len(oracle_pool.os.sched_getaffinity(0))
