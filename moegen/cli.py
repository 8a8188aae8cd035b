"""The `moegen` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import orjson

from moegen.checkpoints.specs import FAMILY_NAMES, PARAM_RANGE, SIZES
from moegen.config import ConfigError
from moegen.models.loader import CheckpointError
from moegen.units import format_bytes, parse_bytes

USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError)


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
def make_model_cmd(out, family, size, seed, expert_layout, max_shard_size, overrides, overwrite):
    """Write a random-weight checkpoint in the exact on-disk format of a real FAMILY into OUT."""
    from moegen.checkpoints.make import make_model

    try:
        made = make_model(out, family, size, seed, expert_layout, parse_bytes(max_shard_size), _override(overrides),
                          overwrite)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    low, high = PARAM_RANGE[size]
    click.echo(f"wrote {made.path}: {family} {size}, {made.parameters / 1e6:.2f}M parameters "
               f"(target {low / 1e6:g}-{high / 1e6:g}M), {format_bytes(made.bytes_on_disk)} in {len(made.files)} "
               f"safetensors file(s), {expert_layout} experts; on a 100-token prompt every expert gets "
               f">= {made.min_expert_load} token(s)")


@main.command("generate")
@click.argument("model_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt (repeatable); all run together.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--engine", type=click.Choice(["reference"]), default="reference", show_default=True,
              help="reference: the sequential model (the runtime's oracle).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt per line, in prompt order.")
def generate_cmd(model_dir, prompts, max_new_tokens, engine, dtype, as_json):
    """Greedy completions of --prompt texts with the model in MODEL_DIR (default: the demo checkpoint)."""
    from moegen.checkpoints.demo import demo_model_dir
    from moegen.generate import generate

    try:
        if model_dir is None:
            model_dir = demo_model_dir()
        elif not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: no such model directory")
        completions, stats = generate(model_dir, list(prompts), max_new_tokens, engine, dtype)
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    for c in completions:
        if as_json:
            record = {"index": c.index, "prompt": c.prompt, "text": c.text, "token_ids": c.token_ids,
                      "finish_reason": c.finish_reason}
            sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
        else:
            click.echo(f"[{c.index}] {c.prompt!r} -> {c.text!r} ({len(c.token_ids)} tokens, {c.finish_reason})")
    sys.stdout.flush()
    rate = stats.generated_tokens / stats.generate_s if stats.generate_s else 0.0
    click.echo(f"moegen: {len(completions)} prompts, {stats.prompt_tokens} prompt + {stats.generated_tokens} generated "
               f"tokens in {stats.generate_s:.2f}s ({rate:.1f} generated tok/s, {engine} engine, {dtype}); "
               f"load {stats.load_s:.2f}s", err=True)


if __name__ == "__main__":
    main()
