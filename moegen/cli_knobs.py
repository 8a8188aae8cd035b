"""The command line's shared options: the runtime knobs (one flag per RuntimeConfig field), planning and
tracing flags, and how they become a RuntimeConfig."""

from __future__ import annotations

from pathlib import Path

import click

from moegen.config import ConfigError
from moegen.models.loader import CheckpointError
from moegen.runtime.backend import DeviceBudgetError
from moegen.units import parse_bytes

# The failures a command reports as its own one-line error (the input, the problem, the fix), not a traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, DeviceBudgetError,
               NotImplementedError)
# The fix for a MODEL_DIR that is not a directory.
MODEL_DIR_FIX = "; pass a checkpoint directory (one with config.json), or make one with `moegen make-model`"

DEVICE_OPTION = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
    help="Backend. auto: cuda where torch sees a GPU (and no --sim-link-gbps), else cpu. cpu runs the same "
         "runtime with worker threads as streams.")
DTYPE_OPTION = click.option(
    "--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
    help="Weights and compute. auto: on cuda the checkpoint's own (config.json), on cpu float32.")


def say(line: str) -> None:
    """A line about the run on stderr (stdout holds only results)."""
    click.echo("moegen: " + line, err=True)


def runtime_options(fn):
    """The runtime's knobs, one flag per RuntimeConfig field."""
    options = [
        DEVICE_OPTION,
        DTYPE_OPTION,
        click.option("--weight-dtype", type=click.Choice(["auto", "fp8", "fp8-all"]), default="auto", show_default=True,
                     help="auto: weights as the checkpoint stores them (FP8 checkpoints stay FP8). fp8: quantize the "
                          "routed experts to FP8 128x128 blocks at load (half the bytes of bf16 on the link; lossy); "
                          "fp8-all: every linear but the routers and lm_head."),
        click.option("--kv-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
                     help="auto: the KV cache in the run dtype. fp8: in e4m3 with a scale per layer and kv head, "
                          "fixed by each layer's first prefill (half the host bytes and link bytes of bf16 per "
                          "token; lossy; --batching module only)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
                     help="B: sequences in flight; finished ones are refilled from the waiting prompts."),
        click.option("--attn-micro-batch", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Sequences per attention launch."),
        click.option("--expert-micro-batch", type=click.IntRange(min=1), default=None,
                     help="Most tokens per expert launch [default: all of an expert's tokens]."),
        click.option("--expert-groups/--no-expert-groups", default=True, show_default=True,
                     help="Run a layer's resident experts in a few grouped launches over all their tokens instead "
                          "of one launch per expert."),
        click.option("--expert-slots", type=click.IntRange(min=1), default=None,
                     help="Experts on the device at once; streams experts through that many slots [default: what fits]."),
        click.option("--resident-experts", type=click.IntRange(min=0), default=None,
                     help="Experts kept on the device for the whole run, the first in layer order "
                          "[default: planned; with --no-plan, what fits beside the minimum slots, none with --expert-slots]."),
        click.option("--gpu-memory", default=None,
                     help="Device memory budget, e.g. 512MiB, 24GiB [default: on cuda the device's free memory at "
                          "start less 1 GiB; unlimited on cpu]."),
        click.option("--host-kv-memory", default=None,
                     help="Host memory for the KV cache, e.g. 8GiB; bounds its blocks, not B [default: what B needs]."),
        click.option("--kv-block-size", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Tokens per block of the paged host KV cache."),
        click.option("--prefix-sharing/--no-prefix-sharing", default=True, show_default=True,
                     help="Store identical leading full KV blocks of prompts once and prefill them once."),
        click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
                     help="Longest prompt + completion [default: the longest prompt + --max-new-tokens]."),
        click.option("--max-step-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
                     help="Most tokens in one step (decode tokens + admitted prompts); sizes activations. Never below "
                          "B - 1 + --max-seq-len (a longest prompt beside every decode token), raised to that if set lower."),
        click.option("--batching", type=click.Choice(["module", "model"]), default="module", show_default=True,
                     help="module: micro-batched attention, each expert once per layer over the whole batch; "
                          "model: one batch walks the whole model, KV on the device (the baselines' policy)."),
        click.option("--cpu-attention", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                     help="Share of each decode step's sequences whose attention runs on host threads over the host KV "
                          "cache (only q, new k/v and the output cross the link; --batching module)."),
        click.option("--cpu-attention-threads", type=click.IntRange(min=1), default=None,
                     help="Threads of the host attention worker [default: torch's intra-op thread count]."),
        click.option("--sim-link-gbps", type=float, default=None, help="cpu: simulate a host-device link of this GB/s."),
        click.option("--no-plan", is_flag=True,
                     help="Don't plan: every knob you leave unset takes its default (see `moegen plan`)."),
        click.option("--trace", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Write a Perfetto trace of the run here (e.g. run.pftrace); see `moegen trace`."),
        click.option("--trace-steps", default=None, metavar="A:B", help="Record only steps A..B-1 (with --trace)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def plan_user(knobs: dict) -> frozenset[str] | None:
    """Pop --no-plan; the knobs the user set on the command line (these are never planned), or None
    with --no-plan (nothing is planned)."""
    from click.core import ParameterSource

    if knobs.pop("no_plan"):
        return None
    ctx = click.get_current_context()
    return frozenset(name for name in knobs
                     if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT))


def need_perfetto(what: str) -> None:
    """Where `what` (--trace, `moegen trace summarize`, a bench scenario) reads or writes Perfetto traces:
    fail now if the perfetto package can't be imported, with the fix, not after loading and planning."""
    try:
        import moegen.trace.protos  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(f"{what}: {exc}") from exc


def trace_options(knobs: dict) -> tuple[Path | None, range | None]:
    """Pop --trace and --trace-steps (not runtime knobs) from the parsed flags."""
    path, steps = knobs.pop("trace"), knobs.pop("trace_steps")
    if path is not None:
        need_perfetto("--trace")
    if steps is None:
        return path, None
    first, sep, end = steps.partition(":")
    try:
        span = range(int(first or 0), int(end) if end else 2**62)
    except ValueError:
        raise click.BadParameter(f"{steps!r}: write A:B (steps A to B-1), e.g. 10:20", param_hint="--trace-steps")
    if not sep or path is None:
        raise click.BadParameter("write A:B and give --trace FILE too", param_hint="--trace-steps")
    return path, span


def runtime_config(knobs: dict):
    """The RuntimeConfig of the parsed flags, its device decided (and said) if auto; the dtype, if auto,
    is decided once the checkpoint is known (`resolve_dtype`)."""
    from moegen.runtime.auto import resolve_device
    from moegen.runtime.config import RuntimeConfig

    values = dict(knobs)
    values["device"] = resolve_device(values["device"], values["sim_link_gbps"], say)
    for name in ("gpu_memory", "host_kv_memory"):
        if values[name] is not None:
            values[name] = parse_bytes(values[name], "--" + name.replace("_", "-"))
    if values["max_seq_len"] is None:
        values.pop("max_seq_len")
    return RuntimeConfig(**values)
