"""`moegen serve-offline`: a dataset in, one result line per request out, resumable after any crash.

    rows -> requests (chat template, tokenization, per-row sampling) -> engine -> results file

Everything that can fail before work (dataset, model, output file) fails first. Finished results
are appended and flushed one line at a time, so an interrupted job loses nothing and `--resume`
writes nothing twice. The first SIGINT/SIGTERM drains (no new prompts; those in flight finish and
are written); a second stops at once.
"""

from __future__ import annotations

import dataclasses
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moegen.io import json_bytes
from moegen.io.dataset import DatasetError, Fields, read_rows
from moegen.io.eta import Eta
from moegen.io.plan_check import PlanCheck
from moegen.io.progress import Live, Progress
from moegen.io.prompts import Defaults, row_request
from moegen.io.results import OutputError, ResultWriter, drop_error_records, id_key, scan
from moegen.runtime.config import RuntimeConfig
from moegen.runtime.kv.sizing import too_long

EXIT_OK, EXIT_FATAL, EXIT_SIGNAL = 0, 1, 130


class RowError(ValueError):
    """--on-error fail: the first bad row ends the job."""


@dataclass(frozen=True, slots=True)
class ServeOptions:
    dataset: Path
    output: Path
    format: str | None = None  # None: from the extension
    fields: Fields = Fields()
    chat_template: Path | None = None  # overrides the tokenizer's
    defaults: Defaults = Defaults()
    output_format: str = "moegen"  # or "openai"
    resume: bool = False
    retry_errors: bool = False
    overwrite: bool = False
    on_error: str = "skip"  # or "fail"
    stats_json: Path | None = None
    fit_seq_len: bool = True  # size KV rows to the longest request instead of rcfg.max_seq_len (unset flag)
    trace: Path | None = None  # write a Perfetto trace of the run here
    trace_steps: range | None = None  # only these steps
    token_ids: bool = False  # also write each completion's token ids
    plan_user: frozenset[str] | None = None  # plan every knob but these (the user's); None: run rcfg as given


@dataclass(slots=True)
class Summary:
    requests: int = 0  # in the dataset
    skipped_done: int = 0  # already in the output (resume)
    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    prefill_tok_s: float = 0.0  # prompt tokens over the generation wall time
    decode_tok_s: float = 0.0  # generated tokens over the generation wall time
    peak_host_memory_gib: float = 0.0
    host_buffers_gib: float = 0.0  # what the engine holds in host memory by design: the weight arena + KV cache
    interrupted: bool = False
    steps: int = 0
    notes: list[str] = field(default_factory=list)
    plan: dict | None = None  # the plan in effect (`moegen plan --json`'s object), when planned
    weight_dtype: str = "auto"  # --weight-dtype
    quantized: dict | None = None  # what --weight-dtype quantized at load (tensors, bytes before and after)
    kv: dict | None = None  # the KV cache: blocks, prefix hits, preemptions (`KVStats`, with its prefix_hit_rate)
    kv_dtype: str = "auto"  # --kv-dtype (fp8: the KV cache in e4m3, lossy)
    engines: int | None = None  # --ray: the engine actors (None: this process's one engine)
    repeated: int = 0  # --ray: results that came again from a batch Ray retried, not written again


def serve_offline(model_dir: Path, opts: ServeOptions, rcfg: RuntimeConfig) -> tuple[int, Summary]:
    """Run the job; returns (exit code, summary)."""
    start = time.perf_counter()
    summary = Summary()
    rows = read_rows(opts.dataset, opts.format, opts.fields)
    _check_unique_ids(rows, opts.dataset)
    summary.requests = len(rows)

    from moegen.generate import load_tokenizer
    from moegen.models.hf_config import load_model_config

    cfg = load_model_config(model_dir)  # model errors before the output file is touched
    tokenizer = load_tokenizer(model_dir)
    template = opts.chat_template.read_text() if opts.chat_template else None
    existing = _prepare_output(opts)
    skip = existing.done | existing.errors  # --retry-errors already removed the error lines
    todo = [i for i, row in enumerate(rows) if id_key(row.id) not in skip]
    summary.skipped_done = len(rows) - len(todo)
    if existing.dropped_bytes:
        summary.notes.append(f"dropped a partial last line ({existing.dropped_bytes} bytes) left by an interrupted run")

    writer = ResultWriter(opts.output, opts.output_format, model=Path(model_dir).name)
    try:
        requests = _requests(rows, todo, tokenizer, opts, cfg.max_position_embeddings, template, writer, summary)
        if requests:
            _generate(model_dir, rcfg, rows, requests, tokenizer, opts, writer, summary)
    finally:
        end_job(writer, summary, start, opts)
    return (EXIT_SIGNAL if summary.interrupted else EXIT_OK), summary


def end_job(writer: ResultWriter, summary: Summary, start: float, opts: ServeOptions) -> None:
    """However the job ended: close the results file; the summary's wall time and peak memory, to --stats-json."""
    writer.close()
    summary.wall_s = time.perf_counter() - start
    summary.peak_host_memory_gib = peak_rss_bytes() / 2**30
    if opts.stats_json:
        opts.stats_json.write_bytes(json_bytes.dumps(asdict(summary), indent=True))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, the high-water mark of this program's own
    address space (ru_maxrss also counts a parent's memory inherited across fork + exec, so a job
    started from a large process would report that process's size)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux (bytes on macOS)


def _check_unique_ids(rows, dataset: Path) -> None:
    first: dict[bytes, str] = {}
    for row in rows:
        key = id_key(row.id)
        if key in first:
            raise DatasetError(f"{dataset}, {row.where}: id {row.id!r} repeats the one at {first[key]}; "
                               "ids must be unique (results and --resume are keyed by them)")
        first[key] = row.where


def _prepare_output(opts: ServeOptions):
    out = opts.output
    if out.exists() and out.is_dir():
        raise OutputError(f"{out} is a directory; --output needs a file path")
    if out.exists() and out.stat().st_size > 0:
        if opts.overwrite:
            out.unlink()
        elif not opts.resume:
            raise OutputError(f"{out} already has results; pass --resume to continue it or --overwrite to start over")
        elif opts.retry_errors:
            drop_error_records(out, opts.output_format)
    for path, flag in ((out, "--output"), (opts.stats_json, "--stats-json")):  # before any work, not after it
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as exc:
            raise OutputError(f"{flag} {path}: can't write there ({exc.strerror or exc}); pass a path in a writable "
                              "folder") from exc
    return scan(out, opts.output_format)


def _progress(engine, requests, plan, model_dir, rcfg) -> Progress:
    """The job's progress line: its ETA from the engine's tokens and steps (the plan's prediction before
    them), and the plan's check."""
    predicted = plan.to_json()["predicted"] if plan is not None else None
    eta = Eta(len(requests), sum(r.max_new_tokens for r in requests), sum(len(r.prompt_ids) for r in requests),
              engine.runtime.rcfg.batch_size, predicted and predicted["job_s"],
              predicted["decode_fixed_share"] if predicted else 0.5)
    check = None
    if predicted is not None:
        check = PlanCheck(predicted["decode_step_s"], plan.to_json()["placement"]["decode_sequences"],
                          str(model_dir), engine.runtime.rcfg.device, engine.runtime.rcfg.dtype)

    def live() -> Live:
        stats, counters = engine.stats, engine.runtime.backend.counters
        busy = counters.busy_s.get("copy H2D weights") if counters.h2d_weight_bytes else None
        return Live(stats.generated_tokens, stats.step_log, stats.running, busy)

    return Progress(total=len(requests), live=live, eta=eta, check=check)


def _requests(rows, todo, tokenizer, opts, context, template, writer, summary):
    """Requests for the rows still to do; bad rows become error records (or end the job)."""
    requests = []
    for i in todo:
        row = rows[i]
        built = row_request(row, i, tokenizer, opts.defaults, context, template, str(opts.dataset))
        if isinstance(built, str):
            if opts.on_error == "fail":
                raise RowError(built)
            writer.error(row.id, built)
            summary.failed += 1
        else:
            requests.append(built)
    return requests


def _generate(model_dir, rcfg, rows, requests, tokenizer, opts, writer, summary) -> None:
    from moegen.planner.plan import open_engine

    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    if opts.fit_seq_len or rcfg.max_seq_len < longest:
        rcfg = dataclasses.replace(rcfg, max_seq_len=longest)
    engine, plan = open_engine(model_dir, rcfg, requests, opts.plan_user, _say, opts.trace, opts.trace_steps)
    summary.plan = None if plan is None else plan.to_json()
    summary.weight_dtype = rcfg.weight_dtype
    summary.kv_dtype = rcfg.kv_dtype
    if rcfg.kv_dtype == "fp8":
        from moegen.runtime.kv.fp8 import NOTE

        summary.notes.append(NOTE)
    if engine.quantized is not None:
        summary.quantized = asdict(engine.quantized)
        summary.notes.append(engine.quantized.note)
    requests = _fit_kv(engine, rows, requests, opts, writer, summary)
    progress = _progress(engine, requests, plan, model_dir, rcfg)
    signals = _Signals(engine, progress)
    began = time.perf_counter()
    try:
        with engine, signals:
            by_id = {r.id: r for r in requests}
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            for result in engine.generate(requests, detokenize=decode):
                request = by_id[result.id]
                text = cut_at_stop(decode(result.token_ids), request.stop_strings)
                writer.result(rows[result.id].id, text, result.finish_reason, result.prompt_tokens,
                              len(result.token_ids), result.token_ids if opts.token_ids else None,
                              rows[result.id].chat)
                summary.ok += 1
                summary.prompt_tokens += result.prompt_tokens
                summary.generated_tokens += len(result.token_ids)
                progress.update(len(result.token_ids), request.max_new_tokens)
            summary.steps = engine.stats.steps
            summary.host_buffers_gib = engine.runtime.host_bytes / 2**30
            kv = engine.stats.kv
            summary.kv = asdict(kv) | {"prefix_hit_rate": kv.prefix_hit_rate}
    finally:
        progress.close()
        elapsed = max(time.perf_counter() - began, 1e-9)
        summary.prefill_tok_s = summary.prompt_tokens / elapsed
        summary.decode_tok_s = summary.generated_tokens / elapsed
        summary.interrupted = signals.count > 0


def _fit_kv(engine, rows, requests, opts, writer, summary):
    """The requests whose prompt fits the host KV cache; each other row is an error record naming
    --host-kv-memory (or ends the job with --on-error fail). None fitting is an error before any work."""
    capacity = engine.runtime.kv_blocks * engine.runtime.kv_block_size
    why = {id(r): too_long(len(r.prompt_ids), capacity) for r in requests}
    fits = [r for r in requests if why[id(r)] is None]
    if requests and not fits:
        shortest = min(len(r.prompt_ids) for r in requests)
        raise ValueError(f"{opts.dataset}: no prompt fits the host KV cache of {capacity} tokens (the shortest has "
                         f"{shortest}); raise --host-kv-memory")
    for request in requests:
        if why[id(request)] is not None:
            message = f"{opts.dataset}, {rows[request.id].where}: {why[id(request)]}"
            if opts.on_error == "fail":
                raise RowError(message)
            writer.error(rows[request.id].id, message)
            summary.failed += 1
    return fits


def _say(line: str) -> None:
    print("moegen: " + line, file=sys.stderr, flush=True)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The completion up to (not including) the first stop string it contains."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


class _Signals:
    """First SIGINT/SIGTERM: drain. Second: stop at once (what's written stays valid)."""

    def __init__(self, engine, progress: Progress):
        self.engine, self.progress, self.count, self._old = engine, progress, 0, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            self.engine.drain()
            self.progress.say(f"{signal.Signals(signum).name}: admitting no new prompts; finishing the "
                              f"{self.engine.runtime.batch_size} or fewer in flight (signal again to stop now)")
            return
        self.progress.say("stopping now; every finished result is in the output file")
        sys.stdout.flush()
        raise KeyboardInterrupt
