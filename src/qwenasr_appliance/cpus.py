"""How many CPUs this process may use: the container's CPU quota and CPU set, not the node's cores.

`os.cpu_count()` counts the node's cores: on a 224-thread node it sized each worker pool of a pod
limited to 16 CPUs at 224 processes. What the container may really use is the smallest of:

- its CFS quota: cgroup v2 `cpu.max` (`"<quota> <period>"` in µs, or `"max <period>"`) of its cgroup
  and every ancestor's, or cgroup v1
  `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: none), rounded up to whole CPUs (1.5 CPUs of
  quota keep 2 processes busy part of the time, as Go and the JVM round);
- the CPUs it may be scheduled on, `os.sched_getaffinity(0)` (a CPU set from `--cpuset-cpus`, the
  kubelet's static CPU manager, or `taskset`);
- the node's cores, `os.cpu_count()`;

and at least 1. The quota is read from the cgroup files as the container sees them at
`/sys/fs/cgroup`: under a cgroup namespace (the default of Docker, Podman, containerd and CRI-O on
cgroup v2) that is its own cgroup; without one, /proc/self/cgroup names the directory below it.
Unreadable or malformed files count as "no quota".
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
# cgroup v1 mounts the cpu controller alone or together with cpuacct, under either name.
_V1_CPU_DIRS: Final = ("cpu", "cpu,cpuacct", "cpuacct,cpu")

CpuLimitSource = Literal["cgroup_quota", "affinity", "cpu_count"]


@dataclass(frozen=True)
class CpuBudget:
    """The CPUs this process may use (`cpus`, at least 1), which limit decided it, and each reading."""

    cpus: int
    source: CpuLimitSource
    node_cpus: int | None  # os.cpu_count()
    affinity_cpus: int | None  # len(os.sched_getaffinity(0)); None where the platform lacks it
    quota_cpus: float | None  # CFS quota / period in CPUs; None: no quota (or unreadable)

    def as_log(self) -> dict[str, int | float | str | None]:
        """The decision as structured-log fields."""
        return {
            "cpus": self.cpus,
            "source": self.source,
            "node_cpus": self.node_cpus,
            "affinity_cpus": self.affinity_cpus,
            "quota_cpus": self.quota_cpus,
        }


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for "no quota"
        return None
    return quota_us / period_us


def own_cgroup_v2(proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """This process' cgroup v2 path (the `0::<path>` line of /proc/self/cgroup), "/" when unknown or in
    a private cgroup namespace."""
    for line in (_read(proc_self_cgroup) or "").splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return "/"


def cgroup_v2_levels(root: Path, own: str) -> list[Path]:
    """The cgroup v2 directories whose limits apply to a process in cgroup `own`: its own, then each
    ancestor up to the mount `root` (resolved). A path out of the mount gives the mount alone."""
    directory = (root / own.strip("/")).resolve() if own.strip("/") else root
    if directory != root and root not in directory.parents:
        directory = root
    levels = [directory]
    while directory != root:
        directory = directory.parent
        levels.append(directory)
    return levels


def _v2_quota(root: Path, own: str) -> float | None:
    """The smallest `cpu.max` quota from the process' own cgroup up to `root` (each ancestor's limit
    applies too); None when no level has one."""
    quotas: list[float] = []
    for directory in cgroup_v2_levels(root, own):
        fields = (_read(directory / "cpu.max") or "").split()
        if len(fields) == 2 and fields[0] != "max":
            ratio = _ratio(fields[0], fields[1])
            if ratio is not None:
                quotas.append(ratio)
    return min(quotas) if quotas else None


def cgroup_quota_cpus(root: Path = CGROUP_ROOT, own: str | None = None) -> float | None:
    """The CFS quota that applies to this process, in CPUs (may be fractional); None without one.

    cgroup v2 (`root/cgroup.controllers` exists): the smallest `cpu.max` from the process' cgroup
    `own` (default: read from /proc/self/cgroup; "/" inside a cgroup namespace) up to `root`. cgroup
    v1: `root/<cpu dir>/cpu.cfs_quota_us` over `cpu.cfs_period_us`. Never raises: a missing or
    malformed file means no quota."""
    if (root / "cgroup.controllers").exists() or (root / "cpu.max").exists():
        return _v2_quota(root.resolve(), own_cgroup_v2() if own is None else own)
    for name in _V1_CPU_DIRS:
        directory = root / name
        quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _affinity() -> int | None:
    getter = getattr(os, "sched_getaffinity", None)
    if getter is None:  # not Linux
        return None
    try:
        return len(getter(0))
    except OSError:
        return None


def cpu_budget(
    root: Path = CGROUP_ROOT,
    *,
    own: str | None = None,
    affinity: int | Literal["detect"] | None = "detect",
    node_cpus: int | Literal["detect"] | None = "detect",
) -> CpuBudget:
    """The CPUs this process may use: the smallest of the cgroup quota at `root` (rounded up), the
    affinity CPU set and the node's cores, at least 1. `own` (the cgroup v2 path), `affinity` and
    `node_cpus` default to this process' own readings; tests pass them (None: unknown)."""
    affinity_cpus = _affinity() if affinity == "detect" else affinity
    node = os.cpu_count() if node_cpus == "detect" else node_cpus
    quota = cgroup_quota_cpus(root, own)
    candidates: list[tuple[int, CpuLimitSource]] = []
    if quota is not None:
        candidates.append((max(1, math.ceil(quota)), "cgroup_quota"))
    if affinity_cpus:
        candidates.append((affinity_cpus, "affinity"))
    if node:
        candidates.append((node, "cpu_count"))
    # min() keeps the first of equal values: a quota equal to the CPU set is reported as the quota.
    cpus, source = min(candidates, key=lambda candidate: candidate[0]) if candidates else (1, "cpu_count")
    return CpuBudget(
        cpus=max(1, cpus),
        source=source,
        node_cpus=node,
        affinity_cpus=affinity_cpus,
        quota_cpus=round(quota, 3) if quota is not None else None,
    )


@functools.cache
def process_cpu_budget() -> CpuBudget:
    """`cpu_budget()` of this process, read once (the quota of a running container does not change
    in practice, and every pool sized from it should agree)."""
    return cpu_budget()


def usable_cpus() -> int:
    """How many CPUs this process may use (at least 1); what every pool "sized from the cores" uses."""
    return process_cpu_budget().cpus


__all__ = [
    "CGROUP_ROOT",
    "CpuBudget",
    "cgroup_quota_cpus",
    "cgroup_v2_levels",
    "cpu_budget",
    "own_cgroup_v2",
    "process_cpu_budget",
    "usable_cpus",
]
