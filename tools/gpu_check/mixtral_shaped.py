"""Stage 4, part 1 (offload.write): a Mixtral-8x7B-shaped checkpoint in the real on-disk format,
written on the machine that runs it, and the plan both mode runs follow.

config.json (specs.config_json's Mixtral spelling at Mixtral-8x7B's widths), generation_config.json,
a byte-level BPE tokenizer (make-model's tiny one: nothing from mistral-common), and one safetensors
shard per layer (embedding in the first, final norm and lm_head in the last) with the index, every
tensor named as in the real checkpoint (`block_sparse_moe.experts.{e}.w1.weight`, ...): the names
and shapes are make-model's own table (meta_checkpoint), so moegen's loader reads it like any other.

The values are small uniform random bfloat16 (norms 1.0), copied from one random pool at a per-tensor
offset: speed does not depend on them, and drawing 40 GiB would take minutes of one core. Shards are
written straight from the pool (no tensor is materialised, host memory stays at the pool's size)
and synced one by one, so the measured rate is the disk's; the writer stops after the layer that
would push it past its time budget and writes the config for the layers it wrote. A complete
checkpoint of the same widths left by an earlier call is reused.

Record: `layers`, `weight_bytes`, `write_s`, `write_gbps` (shards only), `reused`, `stopped_early`, `plan`
(sizing.OffloadPlan), `planned` (the plan made before writing, from which `layers` was the target).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from tools.gpu_check import host, records
from tools.gpu_check.options import CheckOptions
from tools.gpu_check.sizing import DRY, MIXTRAL_8X7B, Budget, Shape, choose
from tools.gpu_check.stages import Outcome, by_name, stage_timeout

POOL_BYTES = 64 * 2**20
SCALE = 0.02  # uniform(-SCALE, SCALE): small activations, no overflow in bfloat16
COMPLETE = "complete.json"  # written last: the checkpoint is whole
SAFETENSORS_BF16 = "BF16"


def paths(opts: CheckOptions) -> tuple[Path, Path]:
    """(the checkpoint dir, the plan file) under the work dir."""
    return opts.work / "offload" / "mixtral-shaped", opts.work / "offload" / "plan.json"


def run(opts: CheckOptions, name: str) -> Outcome:
    shape = DRY if opts.dry_run else MIXTRAL_8X7B
    model_dir, plan_file = paths(opts)
    budget = _budget(opts)
    gpu_memory = opts.gpu_memory or (12 * 2**20 if opts.dry_run else 14 * 2**30)
    target = opts.weights or (48 * 2**20 if opts.dry_run else 40 * 2**30)
    layer_bytes = _layer_bytes(shape)
    most = max(1, target // layer_bytes)
    planned = choose(shape, most, budget, gpu_memory, opts.prompt, opts.decode, opts.batch)
    reused = _complete(model_dir, shape)
    if reused is None:
        write_s = float(os.environ.get("GPU_CHECK_TIMEOUT_S", budget.write_s)) * 0.85 - 5  # the sizing above took some
        written = write_checkpoint(model_dir, shape, planned.layers, write_s)
        layers, rate = written.layers, written.bytes / written.seconds / 1e9
    else:
        layers, rate = reused, None
    at_size = dataclasses.replace(budget, disk_free=2**62)  # the checkpoint exists: only B is chosen now
    plan = choose(shape, layers, at_size, gpu_memory, opts.prompt, opts.decode, opts.batch, fixed_layers=True)
    plan.save(plan_file)
    numbers = {"layers": layers, "weight_bytes": plan.weight_bytes, "reused": reused is not None,
               "stopped_early": reused is None and written.stopped_early,
               "write_s": None if reused is not None else written.seconds, "write_gbps": rate,
               "model_dir": str(model_dir), "plan": dataclasses.asdict(plan), "planned": dataclasses.asdict(planned),
               "headline": f"{layers} layers, {plan.weight_bytes / 2**30:.2f} GiB "
                           + ("reused" if rate is None else f"written at {rate:.2f} GB/s")
                           + (" (stopped early: time)" if reused is None and written.stopped_early else "")
                           + f"; budget {plan.gpu_memory / 2**30:.2f} GiB, B {plan.batch} "
                           f"(model-based fits {plan.model_batch}), link {plan.link_gbps:.1f} GB/s ({plan.link_source})"}
    return Outcome(numbers, None if plan.fits else "no B fits the mode runs' time estimates at the written size")


@dataclass(frozen=True, slots=True)
class Written:
    layers: int
    stopped_early: bool  # the next layer would have passed the time budget
    seconds: float  # writing and syncing the shards (the tokenizer and configs not counted)
    bytes: int  # the tensors'


def write_checkpoint(out: Path, shape: Shape, layers: int, seconds: float, say=print) -> Written:
    """Write the checkpoint with up to `layers` layers, stopping early when the next layer would pass
    `seconds`."""
    from moegen.checkpoints.make import meta_checkpoint, write_index, write_metadata

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = write_metadata(out, "mixtral", "bench", shape.overrides(layers), tokenizer_kind="bpe")
    tensors, _ = meta_checkpoint(cfg)
    shards = _shards({n: tuple(t.shape) for n, t in tensors.items()}, layers)
    pool = torch.empty(POOL_BYTES // 2, dtype=torch.bfloat16).uniform_(-SCALE, SCALE).view(torch.uint8).numpy()
    ones = torch.ones(shape.hidden, dtype=torch.bfloat16).view(torch.uint8).numpy()
    started = time.perf_counter()
    files, done = [], 0
    for i, shard in enumerate(shards[:-1]):
        files.append(_write_shard(out / f"part-{i}.safetensors", shard, pool, ones))
        done = i + 1
        elapsed = time.perf_counter() - started
        if done < layers and elapsed + elapsed / done > seconds:
            break
    last = {n: s for n, s in shards[-1].items()}  # final norm and lm_head
    files.append(_write_shard(out / f"part-{len(files)}.safetensors", last, pool, ones))
    if done < layers:
        write_metadata(out, "mixtral", "bench", shape.overrides(done), tokenizer_kind="bpe")
    weight_map, total = {}, 0
    for i, (path, shard) in enumerate(zip(files, shards[:done] + [last])):
        final = path.with_name(f"model-{i + 1:05d}-of-{len(files):05d}.safetensors")
        path.rename(final)
        weight_map |= {n: final.name for n in shard}
        total += sum(2 * _numel(s) for s in shard.values())
    seconds = time.perf_counter() - started
    write_index(out, weight_map, total)
    (out / COMPLETE).write_text(json.dumps({"layers": done, "shape": dataclasses.asdict(shape), "bytes": total}))
    say(f"wrote {done} layers, {total / 2**30:.2f} GiB in {seconds:.1f} s")
    return Written(done, done < layers, seconds, total)


def _shards(shapes: dict[str, tuple[int, ...]], layers: int) -> list[dict[str, tuple[int, ...]]]:
    """One shard per layer (the embedding joins layer 0's), then one for the final norm and lm_head."""
    shards: list[dict] = [{} for _ in range(layers + 1)]
    for name, shape in shapes.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        index = int(m.group(1)) if m else 0 if name == "model.embed_tokens.weight" else layers
        shards[index][name] = shape
    return shards


def _write_shard(path: Path, shard: dict[str, tuple[int, ...]], pool, ones) -> Path:
    """A safetensors file of bfloat16 tensors, streamed from `pool` (norms from `ones`), then synced.
    The format: an 8-byte little-endian header length, the JSON header (names, dtypes, shapes, byte
    offsets into the data), padded to 8 bytes, then the tensors' bytes back to back."""
    header, offset = {}, 0
    for name, shape in shard.items():
        header[name] = {"dtype": SAFETENSORS_BF16, "shape": list(shape), "data_offsets": [offset, offset + 2 * _numel(shape)]}
        offset += 2 * _numel(shape)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shard.items():
            nbytes = 2 * _numel(shape)
            if name.endswith("norm.weight"):
                f.write(ones[:nbytes].data)
                continue
            at = (zlib.crc32(name.encode()) % (len(pool) // 2)) * 2  # even: on a bfloat16 boundary
            while nbytes:
                chunk = pool[at: at + nbytes]
                f.write(chunk.data)
                nbytes -= len(chunk)
                at = 0
        f.flush()
        os.fsync(f.fileno())
    return path


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer_bytes(shape: Shape) -> int:
    from moegen.checkpoints.make import meta_checkpoint
    from tools.gpu_check.sizing import model_config

    one, two = (2 * sum(t.numel() for t in meta_checkpoint(model_config(shape, n))[0].values()) for n in (1, 2))
    return two - one


def _complete(model_dir: Path, shape: Shape) -> int | None:
    """Layers of a whole checkpoint of these widths already there, or None."""
    marker = model_dir / COMPLETE
    if not marker.is_file():
        return None
    raw = json.loads(marker.read_text())
    return raw["layers"] if raw.get("shape") == dataclasses.asdict(shape) else None


def _budget(opts: CheckOptions) -> Budget:
    """The link (stage 2's record, the fallback, or the simulated one), host memory, disk, part timeouts."""
    if opts.device == "cpu":
        link, source = opts.sim_link_gbps, "simulated (--sim-link-gbps)"
    elif (found := records.latest(opts, "bandwidth")) is not None:
        link, source = found["h2d_gbps"], f"stage 2 (run {found['run']})"
    else:
        link, source = opts.fallback_link_gbps, "fallback (no bandwidth record)"
    part_s = {name: stage_timeout(opts, by_name(name)) for name in ("offload.write", "offload.module", "offload.model")}
    return Budget(opts.device, link, source, host.memory()["available"], host.disk_free(opts.work),
                  host.in_memory(opts.work), part_s["offload.write"], part_s["offload.module"], part_s["offload.model"], opts.write_gbps,
                  opts.load_gbps)
