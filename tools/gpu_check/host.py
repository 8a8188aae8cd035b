"""The host's memory and disk, read from /proc and the filesystem (Linux)."""

from __future__ import annotations

import shutil
from pathlib import Path


def _kib_fields(path: str) -> dict[str, int]:
    """`Name:  123 kB` lines of a /proc file -> {name: bytes}; {} where the file does not exist."""
    out = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0]) * 1024
    return out


def memory() -> dict[str, int]:
    """Host memory, bytes: total, and available to a new process without swapping."""
    info = _kib_fields("/proc/meminfo")
    return {"total": info.get("MemTotal", 0), "available": info.get("MemAvailable", 0)}


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM), bytes; file-backed pages (a checkpoint's mmap) count."""
    return _kib_fields("/proc/self/status").get("VmHWM", 0)


def disk_free(path: Path) -> int:
    """Bytes free on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def in_memory(path: Path) -> bool:
    """Whether `path` lies on a RAM-backed filesystem (tmpfs, ramfs): a file there takes host memory."""
    path, best, kind = Path(path).resolve(), "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and (str(path) + "/").startswith(fields[1].rstrip("/") + "/") and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind in ("tmpfs", "ramfs")
