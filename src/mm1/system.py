"""What this process may use of the machine: one answer for every place that sizes threads or workers.

`os.cpu_count()` is the machine's count; under `taskset`, a cgroup CPU set or a Slurm allocation the
process may run on fewer, and sizing threads by the machine then oversubscribes the cores it has.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """The cores this process may run on (`taskset` and cgroup CPU sets included), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
