"""`moegen make-model`: a random-weight checkpoint in the exact on-disk format of a real family.

The tensors are walked with the loader's own table (so every name and shape the loader expects
is written, and nothing else), drawn at unit scale, rounded to bfloat16 as real checkpoints are
stored, and the routers are balanced on a 100-token calibration prompt so that every expert of
every layer gets tokens (sigmoid routers: through their score-correction bias, as their training does).
With `quantization="fp8"` the linear weights are written in the FP8 block-scaled format
(moegen.checkpoints.quantize).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor

from moegen.checkpoints.balance import balance_routers, calibration_ids
from moegen.checkpoints.quantize import (Quantization, add_quantization_config, check_quantizable, quantize_linears,
                                         scheme_of_made, stored_form)
from moegen.checkpoints.specs import CHAT_TEMPLATES, FAMILY_TEMPLATE, TOKENIZER_KIND, TOKENIZER_VOCAB, config_json
from moegen.checkpoints.tokenizer import write_tokenizer
from moegen.config import ModelConfig
from moegen.models.hf_config import load_model_config
from moegen.models.families import FAMILIES, FUSED_NAMES, LAYER, Family
from moegen.models.loader import INDEX_FILE, SINGLE_FILE, layer_weights, model_weights
from moegen.models.weights import ModelWeights
from moegen.models.reference import ReferenceModel

DEFAULT_SHARD_BYTES = 100 * 2**20  # small/bench checkpoints come sharded, as real ones do


@dataclass(slots=True)
class MadeModel:
    path: Path
    parameters: int  # tensors' elements, all layers (multi-token-prediction ones included)
    bytes_on_disk: int  # safetensors files
    files: list[Path]
    min_expert_load: int  # fewest tokens of a 100-token prompt that any expert of any layer receives


class _RandomTensors:
    """Stands in for the loader's reader: draws each requested tensor instead of reading it.

    Each tensor is drawn from its own generator, seeded by the seed and its per-expert-layout
    name, and fused expert tensors are stacked from those same per-expert draws: one seed gives
    the same model in either layout.
    """

    def __init__(self, seed: int, family: Family):
        self.seed = seed
        self.per_expert = family.moe_names(fused=False)
        # Router tensors whose name moves with the layout (Mixtral's, MiniMax-M2's): fused name -> per-expert name.
        fused = family.moe_names(fused=True)
        self.router_names = {fused[k]: self.per_expert[k] for k in ("gate", "e_score_correction_bias") if k in fused}
        self.tensors: dict[str, Tensor] = {}
        self.linears: set[str] = set()  # names of the linear weights (what an FP8 checkpoint quantizes)
        self.kept_plain: set[str] = set()  # linear weights an FP8 checkpoint keeps unquantized ([1, H] gates)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...], linear: bool = False) -> Tensor:
        t = self._fused(name, shape) if name.endswith(_FUSED_SUFFIXES) else self._draw(name, shape)
        self.tensors[name] = t
        if linear:
            self.linears.add(name)
        return t

    def take_plain(self, name: str, shape: tuple[int, ...]) -> Tensor:
        self.kept_plain.add(name)
        return self.take(name, shape)

    def _draw(self, name: str, shape: tuple[int, ...]) -> Tensor:
        layer = re.match(r"model\.layers\.\d+\.", name)
        if layer and name[layer.end():] in self.router_names:
            name = layer.group(0) + self.router_names[name[layer.end():]]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        t = _init(name, shape, gen)
        if not name.endswith("e_score_correction_bias"):  # real checkpoints keep this one in float32
            t = t.to(torch.bfloat16).float()
        return t

    def _fused(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """[E, 2I, H] gate_up_proj or [E, H, I] down_proj, stacked from the per-expert draws."""
        prefix = LAYER.format(l=re.match(r"model\.layers\.(\d+)\.", name).group(1))
        expert_names = self.per_expert
        if name.endswith(FUSED_NAMES["down_proj"]):
            return torch.stack([self._draw(prefix + expert_names["down_proj"].format(e=e), shape[1:])
                                for e in range(shape[0])])
        half = (shape[1] // 2, shape[2])
        return torch.stack([torch.cat([self._draw(prefix + expert_names[k].format(e=e), half)
                                       for k in ("gate_proj", "up_proj")]) for e in range(shape[0])])


_FUSED_SUFFIXES = (FUSED_NAMES["gate_up_proj"], FUSED_NAMES["down_proj"])


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    normal = torch.randn(shape, generator=gen)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return math.sqrt(3.0) * (1.0 + 0.1 * normal)  # sharp attention where q/k are normalised (see _QUERY_KEY)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * normal  # not all ones, so a swapped norm can't hide
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)  # set by balancing
    if name.endswith(".bias"):
        return 0.1 * normal
    if name.endswith("embed_tokens.weight"):
        return normal
    scale = 1.0 / math.sqrt(shape[-1])  # unit-scale outputs: fan-in is the last dim, 2-D and fused 3-D alike
    if name.endswith(_QUERY_KEY):
        scale *= 3.0  # sharp attention: completions then depend on the context, not only the last token
    return normal * scale


_QUERY_KEY = ("q_proj.weight", "k_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight")
# A random lm_head would end completions at random; shrinking EOS's row lets them run to their length
# (greedy EOS still happens, just rarely), as a real model's mostly do on long answers.
EOS_LOGIT_SCALE = 0.25


def make_model(
    out: Path,
    family: str,
    size: str = "tiny",
    seed: int = 0,
    expert_layout: Literal["per-expert", "fused"] = "per-expert",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overrides: dict | None = None,
    overwrite: bool = False,
    quantization: Quantization = "none",
) -> MadeModel:
    """Write config.json, generation_config.json, tokenizer files and safetensors weights into `out`
    (`quantization="fp8"`: the linear weights FP8 block-scaled, as DeepSeek-V3 ships them)."""
    out = Path(out)
    fused = expert_layout == "fused"
    if quantization != "none":  # refused before anything is written
        check_quantizable(quantization, *_planned_config(family, size, overrides), fused)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file; give a directory for the checkpoint")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; choose an empty or new directory, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:  # --overwrite: no stale shards left behind
        old.unlink(missing_ok=True)
    cfg = write_metadata(out, family, size, overrides)
    draw = _RandomTensors(seed, cfg.family_spec)
    tensors, weights = _random_weights(cfg, draw, fused)
    weights.lm_head[list(cfg.eos_token_ids)] *= EOS_LOGIT_SCALE
    quantized = quantize_linears(tensors, draw.linears) if quantization == "fp8" else {}
    min_load = balance_routers(ReferenceModel(cfg, weights), calibration_ids(out / "tokenizer.json"))
    for name, t in tensors.items():  # balancing moved the routers off the bfloat16 grid
        if not name.endswith("e_score_correction_bias") and name not in quantized:
            t.copy_(t.to(torch.bfloat16))
    if quantized:
        add_quantization_config(out, scheme_of_made(draw.kept_plain))
    stored = {k: v for name, t in tensors.items() for k, v in stored_form(name, t, quantized).items()}
    files = _save(out, stored, max_shard_bytes)
    for path in out.iterdir():  # readable like any downloaded checkpoint (safetensors writes 0600)
        path.chmod(0o644)
    return MadeModel(
        path=out,
        parameters=sum(t.numel() for t in tensors.values()),
        bytes_on_disk=sum(f.stat().st_size for f in files),
        files=files,
        min_expert_load=min_load,
    )


class _ShapesOnly(_RandomTensors):
    """Walks the same tensors as _RandomTensors without allocating them (for counting)."""

    def take(self, name: str, shape: tuple[int, ...], linear: bool = False) -> Tensor:
        self.tensors[name] = torch.empty(shape, device="meta")
        if linear:
            self.linears.add(name)
        return self.tensors[name]


def count_parameters(family: str, size: str, expert_layout: str = "per-expert") -> int:
    """Parameters make_model would write for `family` at `size`, without making anything."""
    tensors, _ = meta_checkpoint(_planned_config(family, size)[0], expert_layout == "fused")
    return sum(t.numel() for t in tensors.values())


def _planned_config(family: str, size: str, overrides: dict | None = None) -> tuple[ModelConfig, dict]:
    """The config (and its config.json fields) make_model would write, without writing anything."""
    from transformers import AutoConfig

    from moegen.models.hf_config import from_hf_config

    vocab = TOKENIZER_VOCAB[TOKENIZER_KIND[size]]
    raw = config_json(family, size, vocab, bos=1, eos=2) | (overrides or {})
    fields = dict(raw)
    return from_hf_config(AutoConfig.for_model(fields.pop("model_type"), **fields), FAMILIES[family]), raw


def meta_checkpoint(cfg: ModelConfig, fused: bool = False) -> tuple[dict[str, Tensor], ModelWeights]:
    """Every tensor a checkpoint of `cfg` holds (name -> a meta tensor of its shape: nothing is
    allocated), and the model's weights over those meta tensors (for sizing a run before writing it)."""
    return _random_weights(cfg, _ShapesOnly(0, cfg.family_spec), fused)


def write_metadata(out: Path, family: str, size: str, overrides: dict | None = None,
                   tokenizer_kind: str | None = None) -> ModelConfig:
    """Tokenizer files, config.json and generation_config.json of a `family` checkpoint at `size`
    (`overrides` replace config.json fields; `tokenizer_kind` replaces the size's tokenizer)."""
    tok = write_tokenizer(out, tokenizer_kind or TOKENIZER_KIND[size], CHAT_TEMPLATES[FAMILY_TEMPLATE[family]])
    raw = config_json(family, size, tok.vocab_size, tok.bos_token_id, tok.eos_token_id) | (overrides or {})
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return load_model_config(out)


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json: tensor name -> shard file name, and the tensors' total bytes."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _random_weights(cfg: ModelConfig, draw: _RandomTensors, fused: bool):
    weights = model_weights(draw, cfg, fused)
    for extra in range(cfg.extra_layers):  # DeepSeek-V3's and GLM's multi-token-prediction layers, as real checkpoints have
        index = cfg.num_layers + extra
        widened = dataclasses.replace(cfg, num_layers=index + 1, moe_layers=cfg.moe_layers + (True,) * (extra + 1),
                                      sliding_windows=cfg.sliding_windows + (None,) * (extra + 1))
        layer_weights(draw, widened, index, fused)
        H, prefix = cfg.hidden_size, LAYER.format(l=index)
        for name, shape in (("enorm.weight", (H,)), ("hnorm.weight", (H,)), ("eh_proj.weight", (H, 2 * H)),
                            ("shared_head.norm.weight", (H,))):
            draw.take(prefix + name, shape)
    return draw.tensors, weights


def _save(out: Path, stored: dict[str, Tensor], max_shard_bytes: int) -> list[Path]:
    """Write `stored` (tensors as they go on disk), sharded at `max_shard_bytes`."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in stored.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
        return [out / SINGLE_FILE]
    files = [out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for path, shard in zip(files, shards):
        save_file(shard, str(path), metadata={"format": "pt"})
    write_index(out, {name: path.name for path, shard in zip(files, shards) for name in shard},
                sum(t.numel() * t.element_size() for t in stored.values()))
    return files
