"""The `moegen` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from moegen.checkpoints.quantize import QUANTIZATIONS
from moegen.checkpoints.specs import FAMILY_NAMES, PARAM_RANGE, SIZES
from moegen.io import json_bytes
from moegen.cli_knobs import (DEVICE_OPTION, DTYPE_OPTION, MODEL_DIR_FIX, USER_ERRORS, need_perfetto, plan_user, runtime_config, runtime_options, say,
                              trace_options)
from moegen.units import format_bytes, parse_bytes
from moegen.cli_bench import bench_cmd
from moegen.cli_serve import serve_offline_cmd



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moegen")
def main():
    """moegen: offline inference of Mixture-of-Experts models by module-based batching."""


def _override(pairs: tuple[str, ...]) -> dict:
    """--set key=value pairs; values are JSON (numbers, null, true, lists) or plain strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write KEY=VALUE, e.g. q_lora_rank=32", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@main.command("make-model")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", type=click.Choice(FAMILY_NAMES), required=True, help="Which real model family to imitate.")
@click.option("--size", type=click.Choice(SIZES), default="tiny", show_default=True,
              help="tiny (<2M params, tests), small (10-40M, demos), bench (150-300M, benchmarks).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--expert-layout", type=click.Choice(["per-expert", "fused"]), default="per-expert", show_default=True,
              help="Per-expert 2-D tensors (real checkpoints) or fused 3-D gate_up_proj/down_proj.")
@click.option("--max-shard-size", default="100MiB", show_default=True, help="Largest safetensors shard, e.g. 2GiB.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config.json field (repeatable), e.g. --set q_lora_rank=32.")
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint already in OUT.")
@click.option("--quantization", type=click.Choice(QUANTIZATIONS), default="none", show_default=True,
              help="none: bfloat16 weights. fp8: every linear weight (attention, MLPs, experts, shared experts) "
                   "FP8 e4m3 with a float32 scale per 128x128 block (`…weight_scale_inv`), as DeepSeek-V3 and "
                   "Qwen3 FP8 ship them; norms, routers, embeddings and lm_head stay bfloat16. With "
                   "--expert-layout fused the expert width must be a multiple of 128 (--set moe_intermediate_size=128).")
def make_model_cmd(out, family, size, seed, expert_layout, max_shard_size, overrides, overwrite, quantization):
    """Write a random-weight checkpoint in the exact on-disk format of a real FAMILY into OUT."""
    from moegen.checkpoints.make import make_model

    try:
        made = make_model(out, family, size, seed, expert_layout, parse_bytes(max_shard_size, "--max-shard-size"), _override(overrides),
                          overwrite, quantization)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    low, high = PARAM_RANGE[size]
    click.echo(f"wrote {made.path}: {family} {size}, {made.parameters / 1e6:.2f}M parameters "
               f"(target {low / 1e6:g}-{high / 1e6:g}M), {format_bytes(made.bytes_on_disk)} in {len(made.files)} "
               f"safetensors file(s), {expert_layout} experts{', FP8 linears' if quantization == 'fp8' else ''}; "
               f"on a 100-token prompt every expert gets >= {made.min_expert_load} token(s)")


@main.command("generate")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeatable); all run together.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--engine", type=click.Choice(["runtime", "reference"]), default="runtime", show_default=True,
              help="runtime: module-based batching; reference: the sequential model (the runtime's oracle).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Prompt i samples with seed + i.")
@click.option("--stop-token-id", "stop_token_ids", type=int, multiple=True, help="Also stop on this id (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Don't stop at the model's EOS.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt per line, in prompt order.")
@runtime_options
def generate_cmd(model_dir, prompts, max_new_tokens, engine, temperature, top_k, top_p, seed, stop_token_ids,
                 ignore_eos, as_json, **knobs):
    """Completions of --prompt texts with the model in MODEL_DIR (default: the demo checkpoint)."""
    from moegen.checkpoints.demo import demo_model_dir
    from moegen.generate import SamplingOptions, generate
    from moegen.runtime.auto import resolve_dtype

    trace, trace_steps = trace_options(knobs)
    user = plan_user(knobs)
    try:
        if model_dir is not None and not model_dir.is_dir():  # before saying anything
            raise FileNotFoundError(f"{model_dir}: no such model directory{MODEL_DIR_FIX}")
        rcfg = runtime_config(knobs)
        options = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, ignore_eos)
        model_dir = model_dir or demo_model_dir()
        rcfg = resolve_dtype(rcfg, model_dir, say=say)
        completions, stats = generate(model_dir, list(prompts), options, engine, rcfg,
                                      fit_seq_len=knobs["max_seq_len"] is None, trace=trace, trace_steps=trace_steps,
                                      plan_user=user, say=say)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    for c in completions:
        if as_json:
            record = {"index": c.index, "prompt": c.prompt, "text": c.text, "token_ids": c.token_ids,
                      "finish_reason": c.finish_reason}
            sys.stdout.buffer.write(json_bytes.dumps(record) + b"\n")
        else:
            click.echo(f"[{c.index}] {c.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
    sys.stdout.flush()
    rate = stats.generated_tokens / stats.generate_s if stats.generate_s else 0.0
    click.echo(f"moegen: {len(completions)} prompts, {stats.prompt_tokens} prompt + {stats.generated_tokens} generated "
               f"tokens in {stats.generate_s:.2f}s ({rate:.1f} generated tok/s, {engine} engine, {rcfg.device}, "
               f"{rcfg.dtype}); load {stats.load_s:.2f}s", err=True)


@main.command("plan")
@click.argument("model_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--requests", type=click.IntRange(min=1), default=256, show_default=True, help="Requests in the job.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="Mean prompt tokens of a request.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per request.")
@click.option("--recalibrate", is_flag=True, help="Measure the device and this model's modules again first.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON (knobs, predicted, bound, alternatives).")
@runtime_options
def plan_cmd(model_dir, requests, prompt_len, max_new_tokens, recalibrate, as_json, **knobs):
    """The knobs `serve-offline` would choose for a job on MODEL_DIR, what they predict and why.
    Knob flags given here are kept, as serve-offline keeps them, and the rest planned around them."""
    from moegen.models.loader import load_checkpoint
    from moegen.planner.cost import Workload
    from moegen.planner.plan import format_plan, plan_run
    from moegen.runtime.auto import resolve_dtype

    if knobs["no_plan"] or knobs["trace"] is not None:
        raise click.UsageError("--no-plan and --trace apply to serve-offline and generate; `moegen plan` only plans: "
                               "drop them")
    trace_options(knobs)
    user = plan_user(knobs)
    if knobs["max_seq_len"] is None:
        knobs["max_seq_len"] = prompt_len + max_new_tokens
    try:
        rcfg = resolve_dtype(runtime_config(knobs), model_dir, say=say)
        cfg, weights, _ = load_checkpoint(model_dir, rcfg.torch_dtype, rcfg.weight_dtype)
        workload = Workload(requests, prompt_len, max_new_tokens, rcfg.max_seq_len)
        plan = plan_run(cfg, weights, rcfg, user, workload, say, recalibrate)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        sys.stdout.buffer.write(json_bytes.dumps(plan.to_json(), indent=True) + b"\n")
    else:
        click.echo(format_plan(plan))


@main.command("calibrate")
@click.argument("model_dirs", nargs=-1, type=click.Path(file_okay=False, exists=True, path_type=Path))
@DEVICE_OPTION
@DTYPE_OPTION
def calibrate_cmd(model_dirs, device, dtype):
    """Measure the device (link, host copies, launch and sync costs) and, for each of MODEL_DIRS, its
    modules' launch times; cached per machine and device for `plan` and `serve-offline`."""
    from moegen.planner.calibrate import calibrated, save
    from moegen.planner.steadiness import measuring
    from moegen.models.loader import load_checkpoint
    from moegen.planner.profile import describe_profile, measure_in_run, measure_profile, signature
    from moegen.runtime.auto import resolve_device, resolve_dtype
    from moegen.runtime.config import RuntimeConfig

    try:
        device = resolve_device(device, say=say)
        cal = calibrated(device, force=True, say=say)
        m = cal.machine
        click.echo(f"{device}: host copies {m.memcpy_gbps:.1f} GB/s; module launch {m.launch_s * 1e6:.1f} us; "
                   f"host sync {m.sync_s * 1e6:.1f} us"
                   + (f"; pinned H2D {m.link_h2d_gbps:.1f} GB/s, D2H {m.link_d2h_gbps:.1f} GB/s"
                      if m.link_h2d_gbps else "; no link measured (the cpu backend's link is simulated: exact)"))
        for model_dir in model_dirs:  # each in its own dtype where --dtype is auto
            rcfg = resolve_dtype(RuntimeConfig(device=device, dtype=dtype), model_dir, say=say)
            cfg, weights, _ = load_checkpoint(model_dir, rcfg.torch_dtype)
            with measuring() as found:
                profile = measure_profile(cfg, weights, device, rcfg.torch_dtype)
                profile.in_run = measure_in_run(cfg, weights, rcfg, profile)
            sig = signature(cfg, rcfg.dtype, weights)
            cal.profiles[sig], cal.steadiness[sig] = profile, found
            click.echo(f"{model_dir}:\n" + describe_profile(profile, cfg))
        path = save(cal)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    unsteady = [f"{k}: {v.note('it')}" for k, v in cal.steadiness.items() if not v.steady]
    if unsteady:
        raise click.ClickException("not all of it was cached, the machine was busy —\n" + "\n".join(unsteady))
    click.echo(f"cached in {path}")


main.add_command(bench_cmd)
main.add_command(serve_offline_cmd)


@main.group("trace")
def trace_group():
    """Read Perfetto traces written with --trace."""


@trace_group.command("summarize")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as JSON.")
def trace_summarize_cmd(file, as_json):
    """Overlap, stream busy fractions, bubbles, module times, GB/s, FLOP/s and the bound, from FILE alone."""
    need_perfetto("moegen trace summarize")
    from moegen.trace.summarize import TraceFileError, format_summary, summarize

    try:
        summary = summarize(file)
    except TraceFileError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        sys.stdout.buffer.write(json_bytes.dumps(summary, indent=True) + b"\n")
    else:
        click.echo(format_summary(summary))


@trace_group.command("view")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=9001, show_default=True)
def trace_view_cmd(file, port):
    """Serve the Perfetto UI offline on 127.0.0.1 with FILE loaded; Ctrl-C stops it."""
    from moegen.trace.view import serve

    try:
        server = serve(file, port)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"moegen: Perfetto UI with {file} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C to stop)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run() -> None:
    """The `moegen` program (the console script, `python -m moegen`): the CLI, then the process ends as soon
    as its output is flushed. Every command has closed its files by the time it returns or exits, so the
    interpreter's teardown (unloading torch and transformers: 0.6-0.9 s here) is skipped. In-process
    callers (tests) use `main`, which returns to them."""
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (moegen ... | head): nothing more can reach it
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
