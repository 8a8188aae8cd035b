"""The runner: each stage in its own process under its own timeout, one log, a table last.

A stage that fails or hangs never stops the next: a hung one is killed (its whole process group)
at its timeout and recorded `timeout`; one that died without writing its record gets one written
here. Timeouts are cut to what is left of the whole check's deadline, so the check ends in time
even when every stage hangs. Stage 4's parts run one after another; the offload record that sums
them up is written here once its last part has ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tools.gpu_check import records
from tools.gpu_check.options import REPO, CheckOptions
from tools.gpu_check.prepare import manifest, prepare
from tools.gpu_check.stages import STAGES, Stage, StageGroup, stage_timeout
from tools.gpu_check.summary import offload_summary, table

KILL_GRACE_S = 3  # after SIGTERM, before SIGKILL (a process stuck in a CUDA call ignores SIGTERM)
LOG = "gpu_check.log"
MAX_LOG_BYTES = 8 * 2**20


class Log:
    """Everything printed: to this terminal and appended to OUT/gpu_check.log, up to MAX_LOG_BYTES
    (what comes back from the GPU machine is at most 16 MiB a file; a stage printing in a loop must
    not cost the log its end)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()
        self.left = MAX_LOG_BYTES

    def say(self, text: str) -> None:
        line = text if text.endswith("\n") else text + "\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            if self.left > 0:
                self.left -= len(line.encode())
                self.file.write(line if self.left > 0 else f"... log cut at {MAX_LOG_BYTES} bytes\n")


def run_all(opts: CheckOptions) -> list[dict]:
    """Run the selected stages; return this invocation's records (the table's rows)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.work.mkdir(parents=True, exist_ok=True)
    options_file = opts.work / f"options-{opts.run_id}.json"
    opts.save(options_file)
    log = Log(opts.out / LOG)
    pip_log = os.environ.get("GPU_CHECK_PIP_LOG")
    if pip_log and Path(pip_log).is_file() and Path(pip_log).read_text().strip():  # tools/gpu_check.sh's wheels
        log.say(Path(pip_log).read_text())
    log.say(f"gpu_check {opts.run_id}: device {opts.device}{' (dry run)' if opts.dry_run else ''}, stages "
            f"{', '.join(opts.stages)}; out {opts.out}; work {opts.work}; deadline {opts.deadline_s:.0f} s")
    deadline = time.monotonic() + opts.deadline_s
    if opts.dry_run and "parity" in opts.stages and manifest(opts.prepared) is None:  # cheap on toy sizes
        log.say(f"--dry-run: preparing the parity data in {opts.prepared} first")
        prepare(opts.prepared, say=log.say)
    rows = []
    for stage in STAGES:
        parts = stage.parts if isinstance(stage, StageGroup) else (stage,)
        ran = [run_stage(opts, part, options_file, deadline, log) for part in parts if part.name in opts.stages]
        rows += ran
        if isinstance(stage, StageGroup) and ran:
            summary = offload_summary(opts, ran)
            records.append(opts, summary)
            rows.append(summary)
    log.say("\n".join(table(rows)))
    log.say(f"records: {opts.out / records.FILE}; log: {opts.out / LOG}")
    return rows


def timeout_for(opts: CheckOptions, stage: Stage, deadline: float) -> float:
    """The stage's budget, cut to what is left of the deadline."""
    return max(1.0, min(stage_timeout(opts, stage), deadline - time.monotonic()))


def run_stage(opts: CheckOptions, stage: Stage, options_file: Path, deadline: float, log: Log) -> dict:
    timeout = timeout_for(opts, stage, deadline)
    log.say(f"\n== {stage.number} {stage.name} (timeout {timeout:.0f} s) ==")
    env = os.environ | {"PYTHONUNBUFFERED": "1", "GPU_CHECK_TIMEOUT_S": f"{timeout:.1f}",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tools.gpu_check.stages", stage.name, str(options_file)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a timeout kills all of it
    relay = threading.Thread(target=_relay, args=(proc.stdout, log), daemon=True)
    relay.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:  # Ctrl-C: the stage is in a session of its own and would go on without us
        _kill_group(proc)
        raise
    relay.join(KILL_GRACE_S)  # the pipe closes when the last process holding it is gone
    seconds = time.monotonic() - started
    record = _written(opts, stage.name)
    if record is None:
        why = (f"killed at its {timeout:.0f} s timeout" if timed_out
               else f"exited with code {proc.returncode} without writing its record")
        record = records.base(opts, stage.name, "timeout" if timed_out else "failed", seconds) | {"error": why}
        records.append(opts, record)
        log.say(f"{stage.name}: {record['status']}: {why}")
    elif timed_out:  # wrote its record, then hung on the way out (e.g. in CUDA teardown)
        log.say(f"{stage.name}: hung after writing its record; killed at its {timeout:.0f} s timeout")
    return record


def _relay(pipe, log: Log) -> None:
    for raw in iter(pipe.readline, b""):
        log.say(raw.decode(errors="replace").rstrip("\n"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group; after a grace, SIGKILL to whatever of it is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _written(opts: CheckOptions, name: str) -> dict | None:
    """The record stage `name` of this invocation wrote, if it did."""
    found = [r for r in records.read(opts.out / records.FILE) if r.get("stage") == name and r.get("run") == opts.run_id]
    return found[-1] if found else None
