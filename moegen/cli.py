"""The `moegen` command line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from moegen.checkpoints.quantize import QUANTIZATIONS
from moegen.checkpoints.specs import FAMILY_NAMES, PARAM_RANGE, SIZES
from moegen.config import ConfigError
from moegen.io import json_bytes
from moegen.models.loader import CheckpointError
from moegen.runtime.backend import DeviceBudgetError
from moegen.cli_knobs import (DEVICE_OPTION, DTYPE_OPTION, need_perfetto, plan_user, runtime_config, runtime_options, say,
                              trace_options)
from moegen.units import format_bytes, parse_bytes
from moegen.cli_bench import bench_cmd

USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError, DeviceBudgetError,
               NotImplementedError)


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
        made = make_model(out, family, size, seed, expert_layout, parse_bytes(max_shard_size), _override(overrides),
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
            raise FileNotFoundError(f"{model_dir}: no such model directory")
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


@main.command("serve-offline")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dataset", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Requests: .jsonl, .json, .csv, .parquet, or the OpenAI batch format [default: examples/prompts.jsonl].")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results, one JSON line per request, appended as each finishes.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "json", "csv", "parquet", "openai"]), default=None,
              help="Dataset format [default: from the extension].")
@click.option("--prompt-field", default="prompt", show_default=True)
@click.option("--messages-field", default="messages", show_default=True, help="Chat rows: a list of {role, content}.")
@click.option("--id-field", default=None, help="Row id field [default: the 0-based row index; OpenAI: custom_id].")
@click.option("--chat-template", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="A Jinja chat template file, instead of the tokenizer's.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Rows without their own temperature use this; 0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Row i samples with seed + i unless it has its own.")
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable); cut from the text.")
@click.option("--ignore-eos", is_flag=True, help="Don't stop at the model's EOS: every request runs to its max tokens.")
@click.option("--output-format", type=click.Choice(["moegen", "openai"]), default="moegen", show_default=True)
@click.option("--output-token-ids", is_flag=True, help="Also write each completion's token ids (\"token_ids\").")
@click.option("--resume", is_flag=True, help="Continue an output file: skip the ids already in it.")
@click.option("--retry-errors", is_flag=True, help="With --resume: run the rows that failed before again.")
@click.option("--overwrite", is_flag=True, help="Start the output file over.")
@click.option("--on-error", type=click.Choice(["skip", "fail"]), default="skip", show_default=True,
              help="skip: write an error record for a bad row and go on; fail: stop at the first.")
@click.option("--stats-json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the summary's numbers here.")
@click.option("--ray", "use_ray", is_flag=True,
              help="Run the engines on a Ray cluster (pip install 'moegen[ray]'): one per GPU, the dataset sharded.")
@click.option("--ray-address", default=None,
              help="With --ray: the cluster's address [default: $RAY_ADDRESS, else a local cluster moegen starts].")
@click.option("--engines", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --ray: engine actors, each with its own copy of the weights in host memory.")
@click.option("--ray-batch-rows", type=click.IntRange(min=1), default=128, show_default=True,
              help="With --ray: rows per batch; each engine runs 4 at once into one batch of B sequences.")
@runtime_options
def serve_offline_cmd(model_dir, dataset, output, fmt, prompt_field, messages_field, id_field, chat_template,
                      max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos, output_format,
                      output_token_ids, resume, retry_errors, overwrite, on_error, stats_json, use_ray, ray_address,
                      engines, ray_batch_rows, **knobs):
    """Run every request of a dataset through MODEL_DIR (default: the demo checkpoint) into --output."""
    from moegen.checkpoints.demo import demo_model_dir
    from moegen.io.dataset import DatasetError, Fields
    from moegen.io.prompts import Defaults
    from moegen.io.results import OutputError
    from moegen.runtime.auto import resolve_dtype
    from moegen.serve import RowError, ServeOptions, serve_offline

    trace, trace_steps = trace_options(knobs)
    user = plan_user(knobs)
    try:
        dataset = dataset or _default_dataset()
        if not dataset.is_file():  # the inputs first, before saying anything
            raise DatasetError(f"{dataset}: no such dataset file")
        if model_dir is not None and not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: no such model directory")
        device, dtype = knobs["device"], knobs["dtype"]  # as given: --ray decides them on each engine's node
        rcfg = runtime_config(knobs)
        model_dir = model_dir or demo_model_dir()
        rcfg = resolve_dtype(rcfg, model_dir, say=say)
        fields = Fields(prompt=prompt_field, messages=messages_field, id=id_field)
        opts = ServeOptions(dataset=dataset, output=output, format=fmt, fields=fields, chat_template=chat_template,
                            defaults=Defaults(max_new_tokens, temperature, top_p, top_k, seed, tuple(stop),
                                              ignore_eos),
                            output_format=output_format, resume=resume, retry_errors=retry_errors,
                            overwrite=overwrite, on_error=on_error, stats_json=stats_json,
                            fit_seq_len=knobs["max_seq_len"] is None, trace=trace, trace_steps=trace_steps,
                            token_ids=output_token_ids, plan_user=user)
        if use_ray:
            from moegen.ray.job import RayOptions, serve_offline_ray

            code, summary = serve_offline_ray(model_dir, opts, rcfg, RayOptions(ray_address, engines, ray_batch_rows,
                                                                                 device=device, dtype=dtype))
        else:
            code, summary = serve_offline(model_dir, opts, rcfg)
    except (DatasetError, OutputError, RowError, ConnectionError, *USER_ERRORS) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo(f"moegen: stopped; every finished result is in {output}. Continue with the same command "
                   "plus --resume.", err=True)
        sys.exit(130)
    _print_summary(summary, output)
    if code == 130:
        click.echo("moegen: interrupted; continue with the same command plus --resume.", err=True)
    sys.exit(code)


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
        raise click.UsageError("--no-plan and --trace apply to serve-offline and generate; `moegen plan` only plans")
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
    from moegen.planner.calibrate import calibrated, cache_path, save
    from moegen.models.loader import load_checkpoint
    from moegen.planner.profile import describe_profile, measure_in_run, measure_profile, signature
    from moegen.runtime.auto import resolve_device, resolve_dtype
    from moegen.runtime.config import RuntimeConfig

    try:
        device = resolve_device(device, say=say)
        cal = calibrated(device, force=True)
        m = cal.machine
        click.echo(f"{device}: host copies {m.memcpy_gbps:.1f} GB/s; module launch {m.launch_s * 1e6:.1f} us; "
                   f"host sync {m.sync_s * 1e6:.1f} us"
                   + (f"; pinned H2D {m.link_h2d_gbps:.1f} GB/s, D2H {m.link_d2h_gbps:.1f} GB/s"
                      if m.link_h2d_gbps else "; no link measured (the cpu backend's link is simulated: exact)"))
        for model_dir in model_dirs:  # each in its own dtype where --dtype is auto
            rcfg = resolve_dtype(RuntimeConfig(device=device, dtype=dtype), model_dir, say=say)
            cfg, weights, _ = load_checkpoint(model_dir, rcfg.torch_dtype)
            profile = measure_profile(cfg, weights, device, rcfg.torch_dtype)
            profile.in_run = measure_in_run(cfg, weights, rcfg, profile)
            cal.profiles[signature(cfg, rcfg.dtype, weights)] = profile
            click.echo(f"{model_dir}:\n" + describe_profile(profile, cfg))
        save(cal)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"cached in {cache_path(cal.key)}")


main.add_command(bench_cmd)


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


def _default_dataset() -> Path:
    here = Path("examples/prompts.jsonl")
    return here if here.is_file() else Path(__file__).resolve().parent.parent / "examples" / "prompts.jsonl"


def kv_line(kv: dict) -> str:
    """The KV cache's summary line: its blocks, the prefix hits and the preemptions."""
    line = (f"KV cache: {kv['blocks']} blocks of {kv['block_size']} tokens, at most {kv['peak_blocks_held']} held; "
            f"{kv['prefill_tokens']} prompt tokens computed")
    if kv["prefix_sharing"]:
        line += f", {kv['prefix_hit_tokens']} found in shared prefix blocks ({kv['prefix_hit_rate']:.0%})"
    if kv["preemptions"]:
        line += f"; {kv['preemptions']} preemptions, {kv['recomputed_tokens']} tokens recomputed"
    if kv["outgrew_pool"]:
        line += f"; {kv['outgrew_pool']} sequences stopped (\"length\") at the cache's size"
    return line


def _print_summary(s, output: Path) -> None:
    lines = [
        f"requests: {s.ok} ok, {s.failed} failed" + (f", {s.skipped_done} already done" if s.skipped_done else "")
        + f" (of {s.requests}) -> {output}",
        f"tokens: {s.prompt_tokens} prompt, {s.generated_tokens} generated "
        + (f"in {s.steps} steps" if s.engines is None else f"by {s.engines} engine(s) on Ray"),
        f"throughput: prefill {s.prefill_tok_s:.1f} tok/s, decode {s.decode_tok_s:.1f} tok/s",
        f"wall time {s.wall_s:.1f}s, peak host memory {s.peak_host_memory_gib:.2f} GiB"
        + (f" (weight arena + KV cache {s.host_buffers_gib:.2f} GiB)" if s.host_buffers_gib else ""),
    ] + ([kv_line(s.kv)] if s.kv else []) + s.notes
    click.echo("\n".join("moegen: " + line for line in lines), err=True)


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
