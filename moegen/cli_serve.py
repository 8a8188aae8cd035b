"""`moegen serve-offline`: its options, and the summary it prints; what runs is moegen.serve (one process)
or moegen.ray.job (--ray)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from moegen.cli_knobs import MODEL_DIR_FIX, USER_ERRORS, plan_user, runtime_config, runtime_options, say, trace_options


@click.command("serve-offline")
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
            raise DatasetError(f"{dataset}: no such dataset file; check the --dataset path")
        if model_dir is not None and not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: no such model directory{MODEL_DIR_FIX}")
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
            if trace is not None:
                raise click.UsageError("--trace records one process's engine; trace a run without --ray")
            try:
                from moegen.ray.job import RayOptions, serve_offline_ray
            except ImportError as exc:
                raise click.ClickException(f"--ray: {exc}") from exc

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
        # both over the same time: a step may hold prompts and decoding sequences; `trace summarize` splits them
        f"throughput over the run: {s.prefill_tok_s:.1f} prompt tok/s, {s.decode_tok_s:.1f} generated tok/s",
        f"wall time {s.wall_s:.1f}s, peak host memory {s.peak_host_memory_gib:.2f} GiB"
        + (f" (weight arena + KV cache {s.host_buffers_gib:.2f} GiB)" if s.host_buffers_gib else ""),
    ] + ([kv_line(s.kv)] if s.kv else []) + s.notes
    click.echo("\n".join("moegen: " + line for line in lines), err=True)
