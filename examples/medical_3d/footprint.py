"""How much memory a loader's processes hold, read from /proc (Linux).

Resident memory (RSS) counts a shared page once in every process that maps
it, so for a cache shared by N workers it reports N copies that do not
exist.  The proportional set size (Pss) splits each shared page among its
mappers: summed over processes, it is the memory they hold, each page once.
"""
from __future__ import annotations

MiB = 1 << 20


def _rollup(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


def footprint(parent: int, workers: list[int]) -> dict[str, float]:
    """MiB held by the parent and the workers: Pss (each page once) and RSS."""
    parent_rollup = _rollup(parent)
    rollups = [_rollup(pid) for pid in workers]
    return {
        "total_pss_mib": (parent_rollup["Pss"] + sum(r["Pss"] for r in rollups)) / MiB,
        "workers_pss_mib": sum(r["Pss"] for r in rollups) / MiB,
        "workers_rss_mib": sum(r["Rss"] for r in rollups) / MiB,
        "parent_pss_mib": parent_rollup["Pss"] / MiB,
    }
