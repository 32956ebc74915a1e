"""Peak host memory of one call, for the benchmark scripts (Linux only)."""

import gc
import time


def status_mib(key: str) -> float:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(key)


def measure(fn):
    """(fn's result, RSS before in MiB, peak RSS during fn in MiB, seconds)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current VmRSS
    before = status_mib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, before, status_mib("VmHWM"), seconds
