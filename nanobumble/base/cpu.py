"""The CPU a run computes on: whether it has native bf16, and how many threads to use.

Both are decided from cheap facts read at start (no timing):

- native bf16: the CPU's capability flags. x86: amx_bf16 (Intel Sapphire Rapids
  and later) or avx512_bf16 (Cooper Lake, AMD Zen 4 and later) in /proc/cpuinfo;
  aarch64 Linux: bf16 in Features (Graviton 3, Neoverse V1/N2); macOS arm64:
  sysctl hw.optional.arm.FEAT_BF16 (M2 and later). There a bf16 matmul runs at 2-4x
  the fp32 rate, so precision "auto" computes in bf16 (base/precision.py); on a CPU
  without them bf16 is emulated and slower than fp32. The environment variable
  NANOBUMBLE_CPU_BF16 (1 or 0) overrides the flags: it is for tests, which use it
  to reach the bf16 branch on any machine.
- threads (num_threads 0): the physical cores this process may use (its affinity,
  a cgroup CPU quota), less the cores other processes keep busy right now (the
  number of runnable threads in /proc/loadavg, a snapshot, not the lagging load
  average), shared between the ranks torchrun started on this machine. More threads
  than free cores is what hurts: a thread that waits for a core holds up every other
  at each barrier, and decoding, made of small steps, slowed 13x on a busy machine.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

BF16_ENV = "NANOBUMBLE_CPU_BF16"  # for tests: 1 claims native bf16, 0 denies it, whatever the flags say
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 (AMX, AVX512), aarch64 Linux (Features)
# Flags shown in the start-up line, best first: what the CPU can do with vectors.
SHOWN_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", "bf16", "sve", "asimd", "FEAT_BF16")


@dataclass(frozen=True)
class CPUInfo:
    name: str
    flags: frozenset[str]

    @property
    def shown_flags(self) -> list[str]:
        return [flag for flag in SHOWN_FLAGS if flag in self.flags] or ["none of " + ", ".join(SHOWN_FLAGS[:5])]

    @property
    def flags_bf16(self) -> bool:
        return bool(self.flags & {*BF16_FLAGS, "FEAT_BF16"})


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _sysctl(name: str) -> str:
    try:
        return subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def cpu_info() -> CPUInfo:
    """The CPU's name and capability flags (read once)."""
    if sys.platform.startswith("linux"):
        name, flags = "", set()
        for line in _read("/proc/cpuinfo").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not name:
                name = value.strip()
            elif key in ("flags", "features") and not flags:  # x86: flags; aarch64: Features
                flags = set(value.split())
        return CPUInfo(name or platform.processor() or platform.machine(), frozenset(flags))
    if sys.platform == "darwin":
        flags = {"FEAT_BF16"} if _sysctl("hw.optional.arm.FEAT_BF16") == "1" else set()
        return CPUInfo(_sysctl("machdep.cpu.brand_string") or platform.machine(), frozenset(flags))
    # Elsewhere (Windows): torch's own CPU probe, where this torch has it
    import torch

    probe = getattr(torch, "cpu", None)
    tests = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    flags = {flag for flag, test in tests.items() if getattr(probe, test, lambda: False)()}
    return CPUInfo(platform.processor() or platform.machine(), frozenset(flags))


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (its flags; NANOBUMBLE_CPU_BF16 overrides, for tests)."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return cpu_info().flags_bf16


def cpu_summary() -> str:
    """cpu: AMD EPYC 7B13, native bf16: no (flags: avx2)"""
    info = cpu_info()
    forced = os.environ.get(BF16_ENV, "").strip()
    note = f", set by {BF16_ENV}={forced}" if forced in ("0", "1") else ""
    return (f"cpu: {info.name}, native bf16: {'yes' if native_bf16() else 'no'} "
            f"(flags: {', '.join(info.shown_flags)}{note})")


# ---------------------------------------------------------------- threads

def _cgroup_cpu_limit() -> float | None:
    """CPUs this process's cgroup may use at once (a container's --cpus), or None for no limit."""
    quota = _read("/sys/fs/cgroup/cpu.max").split()  # cgroup v2: "200000 100000" or "max 100000"
    if len(quota) == 2 and quota[0] != "max":
        return int(quota[0]) / int(quota[1])
    limit, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").strip(), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if limit.lstrip("-").isdigit() and int(limit) > 0 and period.strip().isdigit():
        return int(limit) / int(period)
    return None


def usable_cores() -> int:
    """Physical cores this process may run on: its affinity (taskset, a cpuset) with one
    thread per core where cores have two (SMT), within a cgroup quota."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    siblings = {_read(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").strip() or str(cpu)
                for cpu in cpus}
    cores = len(siblings)
    limit = _cgroup_cpu_limit()
    if limit:
        cores = min(cores, max(1, math.ceil(limit)))
    return max(1, cores)


def _own_runnable_threads() -> int:
    """This process's threads that are running or ready to run (state R in /proc/self/task/*/stat),
    at least 1 (the caller). A process that already runs threads of its own (a server, a test runner)
    must not count them as another process's load."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    running = 0
    for task in tasks:
        stat = _read(f"/proc/self/task/{task}/stat")
        running += stat.rpartition(")")[2].split()[:1] == ["R"]
    return max(1, running)


def busy_cores(samples: int = 5) -> int | None:
    """Cores other processes keep busy now: runnable threads in /proc/loadavg ("2/512": 2
    runnable), less this process's own, the median of a few snapshots 10 ms apart. None off Linux."""
    counts = []
    for i in range(samples):
        fields = _read("/proc/loadavg").split()
        if len(fields) < 4 or not fields[3].partition("/")[0].isdigit():
            return None
        counts.append(int(fields[3].partition("/")[0]) - _own_runnable_threads())
        if i + 1 < samples:
            time.sleep(0.01)
    return max(0, sorted(counts)[len(counts) // 2])


def choose_num_threads(requested: int = 0) -> tuple[int, str]:
    """(threads, why): `requested` when > 0; for 0, this rank's share of the usable cores
    that are not busy, at least 1. Ranks on one machine (torchrun's LOCAL_WORLD_SIZE)
    share the cores, and their own busy threads are not counted against them."""
    if requested > 0:
        return requested, "num_threads"
    cores = usable_cores()
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    busy = busy_cores()
    others = 0 if busy is None else max(0, busy - (local_ranks - 1))  # the other ranks are starting too
    free = max(0, min(cores, (os.cpu_count() or cores) - others))
    threads = max(1, free // local_ranks)
    why = f"{cores} cores" + (f", {others} busy" if busy is not None else "") + \
        (f", {local_ranks} ranks" if local_ranks > 1 else "")
    return threads, why


_applied = ""  # what apply_num_threads chose last, for the start-up line


def apply_num_threads(requested: int = 0) -> int:
    """torch.set_num_threads(choose_num_threads(requested)); returns the thread count."""
    import torch

    global _applied
    threads, why = choose_num_threads(requested)
    torch.set_num_threads(threads)
    _applied = f"threads: {threads} ({why})"
    return threads


def cpu_line() -> str:
    """The start-up line: cpu, native bf16 and its flags, threads and why."""
    import torch

    return f"{cpu_summary()}; {_applied or f'threads: {torch.get_num_threads()}'}"
