"""CPU time and memory of any process, read from Linux's /proc."""

import os

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds the process has used, all threads included."""
    with open(f"/proc/{pid}/stat") as file:
        text = file.read()
    # The command name may hold spaces; the fields after it never do.
    fields = text[text.rindex(")") + 2 :].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_S


def memory_bytes(pid: int) -> dict[str, int]:
    """Resident set size now (`rss`) and its peak so far (`peak_rss`), in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return {"rss": values["VmRSS"], "peak_rss": values["VmHWM"]}


def machine() -> dict[str, str]:
    """The machine's core count and CPU model, for the results' header."""
    model = "unknown"
    with open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    with open("/proc/meminfo") as file:
        total_kib = int(file.readline().split()[1])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": model,
        "memory": f"{total_kib / 2**20:.1f} GiB",
    }
