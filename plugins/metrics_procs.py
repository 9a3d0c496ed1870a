"""The serving processes' own figures for the ``metrics`` plugin's exposition: read from
/proc when /metrics is scraped (prometheus_client's process collector knows no workers):
``workers_alive``, and per worker ``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ``process_max_fds`` (the soft
RLIMIT_NOFILE, from /proc/PID/limits: a worker's own, whatever the master's is now),
``process_start_time_seconds``."""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Optional

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["Processes"]


class Processes:
    """The serving processes' figures, read from /proc when scraped: a collector for
    ``generate_latest``. A process gone meanwhile is left out."""

    def __init__(self, processes: Mapping[int, int]) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily("geproxy_workers_alive",
                                  "Processes serving (1 without workers).")
        cpu = CounterMetricFamily("geproxy_process_cpu_seconds",
                                  "CPU time of each serving process, user and system.",
                                  labels=["worker"])
        rss = GaugeMetricFamily("geproxy_process_resident_memory_bytes",
                                "Resident memory of each serving process.", labels=["worker"])
        fds = GaugeMetricFamily("geproxy_process_open_fds",
                                "Open descriptors of each serving process.", labels=["worker"])
        limit = GaugeMetricFamily("geproxy_process_max_fds",
                                  "Descriptors each serving process may open (its soft "
                                  "RLIMIT_NOFILE).", labels=["worker"])
        start = GaugeMetricFamily("geproxy_process_start_time_seconds",
                                  "When each serving process started, in seconds since the "
                                  "epoch: a worker started again has a later one.",
                                  labels=["worker"])
        alive.add_metric([], len(self.processes))
        for worker, pid in sorted(self.processes.items()):
            found = _proc_figures(pid)
            if found is None:
                continue
            label = [str(worker)]
            cpu.add_metric(label, found[0])
            rss.add_metric(label, found[1])
            fds.add_metric(label, found[2])
            start.add_metric(label, found[3])
            max_fds = _max_fds(pid)
            if max_fds is not None:  # "unlimited", or gone meanwhile
                limit.add_metric(label, max_fds)
        yield from (alive, cpu, rss, fds, limit, start)


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_figures(pid: int) -> Optional[tuple[float, int, int, float]]:
    """CPU seconds, resident bytes, open descriptors and start time of ``pid``; None when
    /proc cannot tell (no /proc, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            # The command name (field 2) may hold spaces: count the fields after it.
            fields = handle.read().rpartition(")")[2].split()
        descriptors = len(os.listdir(f"/proc/{pid}/fd"))
        with open("/proc/stat", encoding="ascii") as handle:
            boot = next(float(line.split()[1]) for line in handle if line.startswith("btime"))
    except (OSError, StopIteration, ValueError):
        return None
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    started = boot + int(fields[19]) / _TICKS  # starttime, in ticks after boot
    return cpu, int(fields[21]) * _PAGE, descriptors, started  # rss, in pages


def _max_fds(pid: int) -> Optional[int]:
    """The soft limit of open files of ``pid`` (its "Max open files" line of
    /proc/PID/limits); None when unlimited or when /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/limits", encoding="ascii") as handle:
            line = next(line for line in handle if line.startswith("Max open files"))
    except (OSError, StopIteration):
        return None
    soft = line[len("Max open files"):].split()[0]
    return int(soft) if soft.isdigit() else None
