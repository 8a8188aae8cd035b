"""`moegen serve-offline --ray`: the same job as in one process, its engines on a Ray cluster.

    the dataset's bytes -> Ray -> rows (moegen's parser) -> [--resume: drop ids done] -> engine actors -> driver
    -> one results file (append-only, one line per id)

Everything that can fail before work fails first, as in one process. The driver alone writes the
file: it keeps the ids already written, so a batch Ray retries after an engine actor died (its rows
come again) writes nothing twice, and `--resume` after the driver itself died skips what is there.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from moegen.io import json_bytes
from moegen.io.dataset import DatasetError, detect_format, parse_rows
from moegen.io.eta import Eta
from moegen.io.progress import Progress
from moegen.io.results import ResultWriter, id_key
from moegen.ray.config import MoegenConfig
from moegen.ray.rows import ROW, parsed
from moegen.runtime.config import RuntimeConfig
from moegen.serve import EXIT_OK, RowError, ServeOptions, Summary, _prepare_output, end_job


@dataclass(frozen=True, slots=True)
class RayOptions:
    address: str | None = None  # None: $RAY_ADDRESS, else a local cluster
    engines: int = 1
    batch_rows: int = 128  # rows per Ray batch; an engine runs `calls` of them at once
    calls: int = 4
    device: str = "auto"  # --device and --dtype as given, decided on each engine's node
    dtype: str = "auto"


def serve_offline_ray(model_dir, opts: ServeOptions, rcfg: RuntimeConfig, ray_opts: RayOptions
                      ) -> tuple[int, Summary]:
    import ray

    from moegen.models.hf_config import load_model_config
    from moegen.ray.cluster import connected, share

    start = time.perf_counter()
    summary = Summary(engines=ray_opts.engines)
    fmt = detect_format(opts.dataset, opts.format)
    load_model_config(model_dir)  # model errors before the output file is touched
    existing = _prepare_output(opts)
    skip = existing.done | existing.errors
    writer = ResultWriter(opts.output, opts.output_format, model=model_dir.name)
    try:
        with connected(ray_opts.address, _say):
            began = time.perf_counter()
            rows = _read(ray, opts, fmt)
            _say(f"ray: read and parsed {rows.count()} rows in {time.perf_counter() - began:.1f}s")
            keys = rows.select_columns(["key"]).take_all()
            _check_unique(keys, rows, opts)
            summary.requests = len(keys)
            summary.skipped_done = sum(item["key"] in skip for item in keys)
            todo = _shards(rows, skip, summary.requests - summary.skipped_done, ray_opts)
            if existing.dropped_bytes:
                summary.notes.append(f"dropped a partial last line ({existing.dropped_bytes} bytes) left by an "
                                     "interrupted run")
            if summary.requests > summary.skipped_done:
                config = _config(model_dir, opts, rcfg, ray_opts, share(ray_opts.engines), todo)
                _write_results(todo, config, opts, writer, summary, skip)
    finally:
        end_job(writer, summary, start, opts)
    return EXIT_OK, summary


def _read(ray, opts: ServeOptions, fmt: str):
    """The dataset's rows, read and parsed in Ray (each with its id's key); a file that can't be parsed at all
    is a DatasetError here."""
    path, fields = opts.dataset, opts.fields

    def parse(file: dict) -> list[dict]:
        return [parsed(row, i) | {"key": id_key(row.id)} for i, row in enumerate(parse_rows(path, file["bytes"],
                                                                                            fmt, fields))]

    try:  # any node may read it: on several nodes, the path must be on storage they share
        return ray.data.read_binary_files(str(Path(path).resolve())).flat_map(parse).materialize()
    except Exception as exc:
        cause = _cause(exc, DatasetError)
        if cause is not None:
            raise cause from None
        raise


def _shards(rows, skip: set[bytes], count: int, ray_opts: RayOptions):
    """The rows still to do, in blocks of a batch each: every engine gets its share, several batches at once."""
    def undone(batch: dict) -> dict:
        keep = [k not in skip for k in batch["key"]]
        return {name: [v for v, kept in zip(values, keep) if kept] for name, values in batch.items() if name != "key"}

    blocks = max(1, math.ceil(count / ray_opts.batch_rows))
    return rows.map_batches(undone, batch_format="numpy").repartition(blocks).materialize()


def _check_unique(keys: list[dict], rows, opts: ServeOptions) -> None:
    seen: set[bytes] = set()
    for item in keys:
        if item["key"] in seen:
            first = [json_bytes.loads(r[ROW])["where"] for r in rows.filter(lambda r, k=item["key"]: r["key"] == k)
                     .take(2)]
            raise DatasetError(f"{opts.dataset}, {first[1]}: id {json_bytes.loads(item['key'])!r} repeats the one at "
                               f"{first[0]}; ids must be unique (results and --resume are keyed by them)")
        seen.add(item["key"])


def _config(model_dir, opts: ServeOptions, rcfg: RuntimeConfig, ray_opts: RayOptions, share, todo) -> MoegenConfig:
    """The engines' config: the job's longest request sizes their rows (unless --max-seq-len), its shape per
    engine is what each plans for."""
    from moegen.planner.cost import Workload
    from moegen.ray.lengths import lengths

    began = time.perf_counter()
    seen = lengths(todo, model_dir, opts)
    _say(f"ray: measured {len(seen)} requests' lengths in {time.perf_counter() - began:.1f}s; starting "
         f"{ray_opts.engines} engine(s) of {share.num_cpus:g} CPUs, {share.num_gpus:g} GPUs, {share.threads} threads")
    workload = None
    if seen:
        if opts.fit_seq_len or rcfg.max_seq_len < max(p + n for p, n in seen):
            rcfg = dataclasses.replace(rcfg, max_seq_len=max(p + n for p, n in seen))
        n = len(seen)
        workload = Workload(math.ceil(n / ray_opts.engines), sum(p for p, _ in seen) / n,
                            sum(c for _, c in seen) / n, rcfg.max_seq_len, 0.0, len({c for _, c in seen}) > 1)
    template = opts.chat_template.read_text() if opts.chat_template else None
    return MoegenConfig(model_dir, rcfg, ray_opts.device, ray_opts.dtype, opts.plan_user, workload, opts.defaults,
                        opts.fields, template, opts.output_format, opts.token_ids, str(opts.dataset),
                        ray_opts.engines, ray_opts.batch_rows, ray_opts.calls, share.num_gpus, share.num_cpus,
                        share.threads)


def _write_results(todo, config: MoegenConfig, opts: ServeOptions, writer: ResultWriter, summary: Summary,
                   skip: set[bytes]) -> None:
    """Every engine's rows into the one file as they arrive, each id once; one progress line for all."""
    from moegen.ray.engine import MoegenEngine, engine_map_args

    written = set(skip)
    total = summary.requests - summary.skipped_done
    cap = round(config.workload.new_tokens) if config.workload is not None else 0  # a request's, on average
    progress = Progress(total=total, eta=Eta(total, cap * total))  # ETA: tokens of finished rows over their rate
    began = time.perf_counter()
    try:
        out = todo.map_batches(MoegenEngine, fn_constructor_args=(config,), **engine_map_args(config))
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for rid, record, error, prompt, completion in zip(batch["id"], batch["record"], batch["error"],
                                                              batch["prompt_tokens"], batch["completion_tokens"]):
                key = str(rid).encode()  # the id's JSON spelling, as `id_key` gives it
                if key in written:
                    summary.repeated += 1  # a batch Ray ran again after its engine died
                    continue
                failed = isinstance(error, str)  # (a batch without errors has a column of NaN there)
                if failed and opts.on_error == "fail":
                    raise RowError(error)
                writer.line(bytes(record))
                written.add(key)
                if not failed:
                    summary.ok += 1
                    summary.prompt_tokens += int(prompt)
                    summary.generated_tokens += int(completion)
                    progress.update(int(completion), cap)
                else:
                    summary.failed += 1
                    progress.update(0, cap)
    finally:
        progress.close()
        elapsed = max(time.perf_counter() - began, 1e-9)
        summary.prefill_tok_s = summary.prompt_tokens / elapsed
        summary.decode_tok_s = summary.generated_tokens / elapsed
    if summary.repeated:
        summary.notes.append(f"{summary.repeated} results came again from batches Ray retried (an engine died); "
                             "each id was written once")


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """The `kind` exception a Ray task raised, under Ray's wrappers."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


def _say(line: str) -> None:
    print("moegen: " + line, file=sys.stderr, flush=True)

