"""How much memory this process may use: the container's cgroup memory limit, not the node's RAM.

The smallest of: cgroup v2 `memory.max` of the process' cgroup and every ancestor's (`max`: none), or
cgroup v1 `memory/memory.limit_in_bytes` (a value near 2**63 means none); and the node's physical
memory (`sysconf(SC_PHYS_PAGES) * SC_PAGE_SIZE`). Read at `/sys/fs/cgroup` as `cpus.py` reads the CPU
quota; unreadable or malformed files count as "no limit".
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Final

from qwenasr_appliance.cpus import CGROUP_ROOT, cgroup_v2_levels, own_cgroup_v2

# cgroup v1 writes the largest page-aligned signed 64-bit value for "no limit".
_V1_UNLIMITED: Final = 1 << 60


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        value = int(text)
    except ValueError:
        return None  # "max", or malformed
    return value if value > 0 else None


def cgroup_memory_limit(root: Path = CGROUP_ROOT, own: str | None = None) -> int | None:
    """The cgroup memory limit that applies to this process in bytes; None without one. v2: the
    smallest `memory.max` from the process' cgroup `own` (default: read from /proc/self/cgroup) up to
    `root`; v1: `root/memory/memory.limit_in_bytes`. Never raises."""
    if (root / "cgroup.controllers").exists() or (root / "memory.max").exists():
        levels = cgroup_v2_levels(root.resolve(), own_cgroup_v2() if own is None else own)
        limits = [limit for level in levels if (limit := _read_int(level / "memory.max")) is not None]
        return min(limits) if limits else None
    limit = _read_int(root / "memory" / "memory.limit_in_bytes")
    return limit if limit is not None and limit < _V1_UNLIMITED else None


def physical_memory() -> int | None:
    """The node's physical memory in bytes; None where sysconf does not say."""
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return pages * page_size if pages > 0 and page_size > 0 else None


@functools.cache
def usable_memory_bytes() -> int | None:
    """The memory this process may use in bytes: the cgroup limit or the node's memory, the smaller;
    None when neither is known. Read once."""
    known = [value for value in (cgroup_memory_limit(), physical_memory()) if value is not None]
    return min(known) if known else None


__all__ = ["cgroup_memory_limit", "physical_memory", "usable_memory_bytes"]
