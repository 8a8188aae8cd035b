"""`MoegenEngine`: the callable class Ray Data's `map_batches` runs, one Engine per actor.

    ds.map_batches(MoegenEngine, fn_constructor_args=(config,), **engine_map_args(config))

Each batch's rows are read, validated and turned into requests by serve-offline's own row functions (a
bad row becomes its error record, not a failed batch), submitted to the actor's one engine stream, and
its output rows are yielded as its requests finish. Several batches run at once in an actor (threads),
all feeding that stream: continuous batching doesn't stop at a batch's end (`MoegenConfig`).
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from moegen.io.prompts import row_request
from moegen.io.results import error_record, result_record
from moegen.ray.config import MoegenConfig
from moegen.ray.rows import columns, output_row, rows_of
from moegen.runtime.kv.sizing import too_long

YIELD_EVERY = 32  # output rows per yielded chunk (the rest when the batch is done)


class MoegenEngine:
    def __init__(self, config: MoegenConfig):
        import torch

        from moegen.generate import load_tokenizer
        from moegen.models.hf_config import load_model_config

        self._born = time.perf_counter()
        torch.set_num_threads(config.threads)
        self.config = config
        self.tokenizer = load_tokenizer(config.model_dir)
        self.context = load_model_config(config.model_dir).max_position_embeddings
        self.model = config.model_dir.name
        self._lock = threading.Lock()
        self._engine = self._stream = None

    def __call__(self, batch: dict[str, Any]) -> Iterator[dict[str, list]]:
        c = self.config
        errors, requests, rows = [], [], []
        for row, index in rows_of(batch, c.fields, c.source):
            built = row_request(row, index, self.tokenizer, c.defaults, self.context, c.chat_template, c.source)
            if isinstance(built, str):
                errors.append(output_row(row.id, error_record(c.output_format, row.id, built), error=built))
            else:
                built.id = len(requests)
                requests.append(built)
                rows.append(row)
        stream = self._stream_for(requests) if requests else None
        if stream is not None:
            fits = []
            for request, row in zip(requests, rows):
                if (why := self._refusal(request)) is None:
                    fits.append(request)
                else:
                    message = f"{c.source}, {row.where}: {why}"
                    errors.append(output_row(row.id, error_record(c.output_format, row.id, message), error=message))
            requests = fits
        if errors:
            yield columns(errors)
        if not requests:
            return
        done = []
        for result in stream.submit(requests):
            done.append(self._output(rows[result.id], requests[result.id], result))
            if len(done) == YIELD_EVERY:
                yield columns(done)
                done = []
        if done:
            yield columns(done)

    def _output(self, row, request, result) -> dict:
        from moegen.serve import cut_at_stop

        c = self.config
        text = cut_at_stop(self.tokenizer.decode(result.token_ids, skip_special_tokens=True), request.stop_strings)
        n = len(result.token_ids)
        record = result_record(c.output_format, self.model, row.id, text, result.finish_reason,
                               result.prompt_tokens, n, result.token_ids if c.token_ids else None, row.chat)
        return output_row(row.id, record, text, result.finish_reason, result.prompt_tokens, n)

    def _refusal(self, request) -> str | None:
        """Why this engine can't hold the request (an error record), or None."""
        rcfg = self._engine.rcfg
        if len(request.prompt_ids) + request.max_new_tokens > rcfg.max_seq_len:
            return (f"prompt of {len(request.prompt_ids)} tokens + {request.max_new_tokens} new tokens exceeds the "
                    f"engines' max_seq_len of {rcfg.max_seq_len}; raise --max-seq-len (MoegenConfig.runtime)")
        rt = self._engine.runtime
        return too_long(len(request.prompt_ids), rt.kv_blocks * rt.kv_block_size)

    def _stream_for(self, requests):
        """The actor's engine stream, built by the first batch (planned on the job's workload, else on it)."""
        with self._lock:
            if self._stream is None:
                self._engine = self._open(requests)
                self._stream = self._engine.stream(
                    lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))
            return self._stream

    def _open(self, requests):
        from moegen.planner.plan import open_engine

        c = self.config
        began = time.perf_counter()
        rcfg = dataclasses.replace(c.runtime, device=c.device, dtype=c.dtype)
        engine, _ = open_engine(c.model_dir, rcfg, requests, c.plan, _say, workload=c.workload)
        _say(f"engine ready in {time.perf_counter() - began:.1f}s (weights loaded, knobs planned), "
             f"{time.perf_counter() - self._born:.1f}s after its actor started")
        in_flight = c.batch_rows * c.calls_per_engine
        more = c.workload is None or c.workload.requests > in_flight  # else every row is in flight at once anyway
        if more and in_flight < 2 * engine.runtime.batch_size:
            _say(f"an engine runs B={engine.runtime.batch_size} sequences but is fed {c.calls_per_engine} batches "
                 f"of {c.batch_rows} rows at once: as a batch ends its B may not stay full; raise --ray-batch-rows "
                 f"to at least {-(-2 * engine.runtime.batch_size // c.calls_per_engine)}")
        return engine

    def __del__(self):
        if self._stream is not None:
            self._stream.cancel()
            self._engine.close()


def _say(line: str) -> None:
    print("moegen: " + line, file=sys.stderr, flush=True)


def engine_map_args(config: MoegenConfig) -> dict:
    """`map_batches` keyword arguments that run `MoegenEngine` as `config` says: its actors, their resources,
    and batches run at once per actor."""
    from ray.data import ActorPoolStrategy

    return dict(batch_size=config.batch_rows, num_cpus=config.num_cpus, num_gpus=config.num_gpus,
                compute=ActorPoolStrategy(size=config.engines, max_concurrent_calls_per_actor=config.calls_per_engine,
                                          enable_true_multi_threading=True),
                batch_format="numpy", **config.extra)
