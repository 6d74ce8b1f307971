"""How many CPU threads llama.cpp should run: the performance cores this process may use, fewer
while other programs keep some of them busy.

llama.cpp's threads meet at a barrier after every operation of a decode (hundreds a token). When
another program takes the core of one of them, the others wait at each barrier for a time slice,
and generation collapses: with one CPU-bound process beside it on a 2-core machine, two threads
made 17 generated tok/s against 416 idle, one thread 240 (docs/throughput.md, A busy machine).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

SYSFS = Path("/sys/devices")
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")  # psutil.cpu_times fields that are not idle


def cpu_list(text: str) -> set[int]:
    """The CPUs of a sysfs cpulist ("0-7,16,18-19")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def allowed_cpus() -> set[int] | None:
    """The logical CPUs this process may run on (its affinity: a container's or `taskset`'s share),
    None where the OS does not say (macOS, Windows)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:
        return None


def performance_cpus(allowed: set[int], sysfs: Path = SYSFS) -> set[int]:
    """Of the allowed CPUs, those on performance cores: Intel's hybrid CPUs list their P-cores in
    /sys/devices/cpu_core/cpus (E-cores in cpu_atom), and llama.cpp's threads all wait for the
    slowest. Where that list is absent, or none of the allowed CPUs is on it, all of them."""
    try:
        performance = cpu_list((sysfs / "cpu_core" / "cpus").read_text()) & allowed
    except (OSError, ValueError):
        return allowed
    return performance or allowed


def default_threads(sysfs: Path = SYSFS) -> int:
    """llama.cpp's threads when not told: one per physical performance core this process may run
    on, as llama.cpp itself counts them; a second hardware thread of a core only waits for the
    first in these compute-bound loops."""
    allowed = allowed_cpus()
    if allowed is None:
        return _macos_performance_cores() or max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in performance_cpus(allowed, sysfs):
        try:
            topology = sysfs / "system" / "cpu" / f"cpu{cpu}" / "topology"
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _macos_performance_cores() -> int | None:
    """Apple silicon's performance cores (hw.perflevel0), None elsewhere or where sysctl does not say."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        return int(out) if out.isdigit() and int(out) > 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the CPUs this process may run on, this process's own CPU seconds), both
    counted since some fixed moment; None where psutil cannot read them."""
    try:
        import psutil

        per_cpu = psutil.cpu_times(percpu=True)
    except Exception:  # psutil missing, or a platform it cannot read: no governing, not an error
        return None
    allowed = allowed_cpus()
    busy = sum(getattr(t, name, 0.0) for cpu, t in enumerate(per_cpu) if allowed is None or cpu in allowed
               for name in BUSY_FIELDS)
    own = os.times()
    return busy, own.user + own.system


class ThreadGovernor:
    """Threads for llama.cpp's next decode: the cores other programs leave free, re-read at most
    once every `interval` seconds from the CPUs' busy time less this process's own.

    Others keeping 0.6 of a core busy on a 2-core machine leave 1.4 cores, rounded to 1 thread: a
    thread that shares its core stalls every barrier, and one thread fewer costs about 30%
    (measured). Thread count does not change what is computed (each row's sums stay in one
    thread; tests/test_llamacpp.py), so a run's data stays the same whatever the governor does."""

    def __init__(self, most: int, interval: float = 1.0, read=cpu_seconds, clock=time.monotonic):
        self.most, self.interval, self._read, self._clock = most, interval, read, clock
        allowed = allowed_cpus()
        self.cpus = len(allowed) if allowed is not None else (os.cpu_count() or most)
        self.current = most
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        seconds = self._read()
        return None if seconds is None else (self._clock(), *seconds)

    def busy_elsewhere(self) -> float | None:
        """Cores' worth of CPU time other programs used on this process's CPUs since the last
        reading (None where nothing can be read)."""
        now = self._sample()
        if now is None or self._last is None:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._last, now
        self._last = now
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9)

    def threads(self) -> int:
        if self._last is None or self._clock() - self._last[0] < self.interval:
            return self.current
        others = self.busy_elsewhere()
        if others is not None:
            self.current = max(1, min(self.most, round(self.cpus - others)))
        return self.current
