"""Threads for llama.cpp: performance cores, and fewer while other programs keep cores busy."""

import os
import subprocess
import sys
import time

import pytest

from magpie_local.cpu import ThreadGovernor, cpu_list, cpu_seconds, default_threads, performance_cpus


def test_cpu_lists_are_read_as_sysfs_writes_them():
    assert cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert cpu_list("5") == {5} and cpu_list("") == set()


def _sysfs(root, cores: dict[int, int], performance: str | None = None):
    """A sysfs tree: logical CPU -> core id (one package); `performance`: cpu_core/cpus, if any."""
    for cpu, core in cores.items():
        topology = root / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")
    if performance is not None:
        (root / "cpu_core").mkdir()
        (root / "cpu_core" / "cpus").write_text(performance + "\n")
    return root


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux's")
def test_threads_are_one_per_physical_performance_core(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    # 4 cores with 2 hardware threads each: 4 threads.
    assert default_threads(_sysfs(tmp_path / "smt", {c: c // 2 for c in range(8)})) == 4
    # A hybrid Intel: CPUs 0-3 are two P-cores with SMT, 4-7 four E-cores: the P-cores only.
    hybrid = _sysfs(tmp_path / "hybrid", {0: 0, 1: 0, 2: 1, 3: 1, 4: 8, 5: 9, 6: 10, 7: 11}, performance="0-3")
    assert performance_cpus(set(range(8)), hybrid) == {0, 1, 2, 3}
    assert default_threads(hybrid) == 2
    # Allowed only E-cores (taskset): those, rather than none.
    assert performance_cpus({5, 6}, hybrid) == {5, 6}


def test_the_governor_leaves_the_cores_others_use():
    """Readings are (busy seconds of the allowed CPUs, this process's seconds); 2 CPUs here."""
    readings = iter([(0.0, 0.0), (2.0, 2.0), (4.0, 3.0), (5.6, 4.0), (7.3, 5.4), (9.3, 7.4)])
    clock = iter([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # seconds: once at the start, then twice a call
    governor = ThreadGovernor(2, interval=1.0, read=lambda: next(readings), clock=lambda: float(next(clock)))
    governor.cpus = 2
    assert [governor.threads() for _ in range(5)] == [
        2,  # alone: everything busy was ours
        1,  # another program took a whole core
        1,  # 0.6 of a core: 1.4 left, 1 thread
        2,  # 0.3 of a core: 2 threads again
        2]  # alone again
    quiet = ThreadGovernor(2, read=lambda: None)  # nothing to read (no psutil): the most, always
    assert quiet.threads() == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pins the busy process to a CPU (Linux)")
def test_the_governor_sees_a_real_busy_process():
    """A real CPU-bound process on one of this process's CPUs counts as about a core used by
    others; once it ends, it no longer does."""
    assert cpu_seconds() is not None
    governor = ThreadGovernor(1)
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        time.sleep(0.5)  # started and pinned
        governor.busy_elsewhere()
        time.sleep(1.0)
        assert governor.busy_elsewhere() > 0.7
    finally:
        hog.kill()
        hog.wait()
    time.sleep(1.0)
    assert governor.busy_elsewhere() < 0.5
