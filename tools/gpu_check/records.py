"""records.jsonl: one JSON object per line, one line per stage (or part) run, appended as it ends.

Every record has `stage`, `status` (ok, failed, timeout, skipped), `run` (the invocation),
`device`, `dry_run`, `seconds` and `versions`; failed and timeout ones an `error`, skipped ones a
`reason`; the rest are the stage's numbers and a one-line `headline` for the table. Each line goes
to OUT/records.jsonl (what comes back from the GPU machine) and to the work dir's history (what a
rerun in a later call reads).
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tools.gpu_check.options import CheckOptions

FILE = "records.jsonl"
STATUSES = ("ok", "failed", "timeout", "skipped")


def installed(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """python, torch, its CUDA, transformers: the versions each record carries."""
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": installed("transformers")}


def base(opts: CheckOptions, stage: str, status: str, seconds: float) -> dict:
    """The fields every record starts with."""
    if status not in STATUSES:
        raise ValueError(f"record status {status!r}; expected one of {', '.join(STATUSES)}")
    return {"stage": stage, "status": status, "run": opts.run_id, "device": opts.device, "dry_run": opts.dry_run,
            "seconds": round(seconds, 3), "versions": versions()}


def append(opts: CheckOptions, record: dict) -> None:
    """Add `record` as one line to OUT/records.jsonl and the work dir's history, flushed to disk at once
    (a process killed right after still leaves it)."""
    line = json.dumps(record, default=str) + "\n"
    for path in (opts.out / FILE, opts.work / FILE):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read(path: Path) -> list[dict]:
    """Every record of a records.jsonl; a torn last line (a writer killed mid-write) is left out."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def latest(opts: CheckOptions, stage: str, status: str = "ok") -> dict | None:
    """The newest `stage` record with `status` on this device and sizes: this call's OUT first, then
    the work dir's history (a rerun of one stage in a later call)."""
    for path in (opts.out / FILE, opts.work / FILE):
        found = [r for r in read(path) if r.get("stage") == stage and r.get("status") == status
                 and r.get("device") == opts.device and r.get("dry_run") == opts.dry_run]
        if found:
            return found[-1]
    return None
