"""Load a local Hugging Face checkpoint directory into the model units' weights.

safetensors only (single file, or sharded with `model.safetensors.index.json`), no network, no
pickle. Every tensor the config implies is read through one reader that checks its shape and
records its name; anything missing, mis-shaped or left over is an error naming it. Tensors that
transformers itself ignores for the same checkpoint are skipped and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor

from moegen.config import GQAConfig, MLAConfig, ModelConfig
from moegen.formats import fp8
from moegen.formats.fp8 import BlockFp8, Fp8Scheme
from moegen.formats.weight_dtype import Quantized, apply_weight_dtype
from moegen.models.hf_config import load_model_config, read_config_json
from moegen.models.families import DENSE_NAMES, GLOBAL_NAMES, GQA_NAMES, LAYER, MLA_NAMES, NORM_NAMES, Family
from moegen.models.weights import GQAWeights, LayerWeights, MLAWeights, MLPWeights, ModelWeights, MoEWeights, RouterWeights

INDEX_FILE = "model.safetensors.index.json"
# Fields of the attention units that are linear weights (quantizable): MLA's kv_b_proj too.
LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"})
SINGLE_FILE = "model.safetensors"
# Non-persistent buffers some older checkpoints still carry; transformers drops them.
_ALWAYS_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint's tensors don't match its config: names the file, the tensor and the fix."""


@dataclass(slots=True)
class LoadReport:
    files: list[Path]  # safetensors files read
    expert_layout: Literal["per-expert", "fused", "none"]
    quantization: Fp8Scheme | None = None  # config.json's quantization_config (its linears kept as stored)
    quantized: Quantized | None = None  # what --weight-dtype quantized at load
    loaded: set[str] = field(default_factory=set)  # tensor names read into the weights
    skipped: list[str] = field(default_factory=list)  # names ignored as transformers ignores them

    @property
    def note(self) -> str:
        if not self.skipped:
            return ""
        layers = sorted({m.group(1) for n in self.skipped if (m := re.match(r"model\.layers\.(\d+)\.", n))})
        where = f" (layers {', '.join(layers)}: multi-token-prediction heads)" if layers else ""
        return f"skipped {len(self.skipped)} tensors that transformers ignores{where}"


class TensorStore:
    """Tensor names -> the safetensors file holding them; reads lazily, one tensor at a time."""

    def __init__(self, model_dir: Path):
        self.model_dir = Path(model_dir)
        self.file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, str] = {}  # safetensors dtype names ("BF16", "F8_E4M3", ...)
        # One open handle per file for the store's life: opening the file for each tensor cost ~2 ms
        # a tensor (a tiny DeepSeek-V3-like checkpoint's 2,433 tensors: 4.8 s to load, 0.06 s kept open).
        self._open: dict[Path, object] = {}
        for path in self._files():
            f = self._open[path] = safe_open(str(path), framework="pt")
            for name in f.keys():
                self.file_of[name] = path
                part = f.get_slice(name)
                self._shapes[name], self._dtypes[name] = tuple(part.get_shape()), part.get_dtype()

    def _files(self) -> list[Path]:
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            try:
                files = sorted({self.model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # ValueError covers bad JSON/UTF-8
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object of "
                                      f"tensor name -> file name): {exc!r}; copy it from the checkpoint again") from exc
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard(s) {missing} that are not in {self.model_dir}; copy the whole checkpoint")
            return files
        single = self.model_dir / SINGLE_FILE
        if single.is_file():
            return [single]
        pickles = sorted(p.name for p in self.model_dir.glob("*.bin")) + sorted(p.name for p in self.model_dir.glob("*.pt"))
        hint = (f"; found {pickles}: moegen does not load pickle checkpoints, convert them to safetensors"
                if pickles else "; copy the checkpoint's safetensors files into it")
        raise CheckpointError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def get(self, name: str) -> Tensor:
        return self._open[self.file_of[name]].get_tensor(name)


class _Reader:
    """Reads named tensors with their expected shapes, converting to `dtype`; records what it read.
    Linear weights stored as FP8 (`linear=True`) come back as stored, with their scales (`BlockFp8`)."""

    def __init__(self, store: TensorStore, dtype: torch.dtype, report: LoadReport):
        self.store, self.dtype, self.report = store, dtype, report

    def has(self, name: str) -> bool:
        return name in self.store.file_of

    def take(self, name: str, shape: tuple[int, ...], linear: bool = False) -> Tensor | BlockFp8:
        self._check(name, shape)
        self.report.loaded.add(name)
        scale = fp8.scale_name(name)
        if self.store.dtype(name) != "F8_E4M3":
            if self.has(scale):
                raise CheckpointError(f"{self.store.file_of[scale]}: {scale!r} scales {name!r}, which is stored as "
                                      f"{self.store.dtype(name)}, not F8_E4M3; the checkpoint is inconsistent, copy "
                                      "or convert it again")
            return self.store.get(name).to(self.dtype)
        where = f"{self.store.file_of[name]}: tensor {name!r} is FP8 (F8_E4M3)"
        if not linear:
            raise CheckpointError(f"{where}; moegen reads norms, routers, embeddings and lm_head as stored in a float "
                                  "dtype only (quantize linear weights alone)")
        if self.report.quantization is None:
            raise CheckpointError(f"{where} but config.json has no quantization_config; add the checkpoint's "
                                  'quantization_config ({"quant_method": "fp8", "weight_block_size": [128, 128], ...})')
        if not self.has(scale):
            raise CheckpointError(f"{where} but its block scales {scale!r} are missing; the checkpoint is incomplete, "
                                  "copy the whole checkpoint")
        self._check(scale, fp8.scale_grid(shape), what=f"the scale grid of {list(shape)} in {list(fp8.BLOCK)} blocks is")
        if self.store.dtype(scale) != "F32":
            raise CheckpointError(f"{self.store.file_of[scale]}: scale {scale!r} is {self.store.dtype(scale)}; "
                                  "moegen reads float32 (F32) block scales only")
        self.report.loaded.add(scale)
        return BlockFp8(self.store.get(name), self.store.get(scale))

    def take_plain(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A linear weight moegen keeps unquantized even where the checkpoint stores it as FP8 (a [1, H] gate)."""
        w = self.take(name, shape, linear=True)
        return fp8.dequantize(w, self.dtype) if isinstance(w, BlockFp8) else w

    def _check(self, name: str, shape: tuple[int, ...], what: str = "") -> None:
        if name not in self.store.file_of:
            raise CheckpointError(
                f"{self.store.model_dir}: missing tensor {name!r} (expected shape {list(shape)} from config.json); "
                "the checkpoint is incomplete or config.json doesn't describe it: copy the whole checkpoint with "
                "its own config.json"
            )
        actual = self.store.shape(name)
        if actual != tuple(shape):
            raise CheckpointError(f"{self.store.file_of[name]}: tensor {name!r} has shape {list(actual)}, "
                                  f"{what or 'config.json implies'} {list(shape)}; "
                                  + ("copy or convert the checkpoint again" if what else
                                     "use the checkpoint's own config.json"))


def load_checkpoint(model_dir: Path, dtype: torch.dtype = torch.float32, weight_dtype: str = "auto"
                    ) -> tuple[ModelConfig, ModelWeights, LoadReport]:
    """config.json + safetensors of `model_dir` -> (config, weights in `dtype`, what was read). FP8 linears stay
    as stored; `weight_dtype` (--weight-dtype) may quantize others at load."""
    cfg = load_model_config(model_dir)
    scheme = fp8.scheme_of(read_config_json(model_dir), Path(model_dir) / "config.json")
    store = TensorStore(model_dir)
    layout = _expert_layout(store, cfg)
    report = LoadReport(files=sorted(set(store.file_of.values())), expert_layout=layout, quantization=scheme)
    reader = _Reader(store, dtype, report)
    weights = model_weights(reader, cfg, layout == "fused")
    _check_leftovers(store, cfg, report)
    report.quantized = apply_weight_dtype(weights, weight_dtype)
    return cfg, weights, report


def _expert_layout(store: TensorStore, cfg: ModelConfig) -> Literal["per-expert", "fused", "none"]:
    if not any(cfg.moe_layers):
        return "none"
    fused = any(name.endswith(".mlp.experts.gate_up_proj") for name in store.file_of)
    return "fused" if fused else "per-expert"


def model_weights(r: _Reader, cfg: ModelConfig, fused: bool) -> ModelWeights:
    V, H = cfg.vocab_size, cfg.hidden_size
    embed = r.take(GLOBAL_NAMES["embed_tokens"], (V, H))
    layers = [layer_weights(r, cfg, layer, fused) for layer in range(cfg.num_layers)]
    norm = r.take(GLOBAL_NAMES["norm"], (H,))
    if cfg.tie_word_embeddings:
        lm_head = embed
        if r.has(GLOBAL_NAMES["lm_head"]):
            r.report.skipped.append(GLOBAL_NAMES["lm_head"])  # tied: transformers uses the embedding
    else:
        lm_head = r.take(GLOBAL_NAMES["lm_head"], (V, H))
    return ModelWeights(embed_tokens=embed, layers=layers, norm=norm, lm_head=lm_head)


def layer_weights(r: _Reader, cfg: ModelConfig, layer: int, fused: bool) -> LayerWeights:
    prefix = LAYER.format(l=layer)
    H = cfg.hidden_size
    attn = _mla(r, cfg.attention, prefix) if isinstance(cfg.attention, MLAConfig) else _gqa(r, cfg.attention, prefix)
    is_moe = cfg.moe_layers[layer]
    return LayerWeights(
        input_layernorm=r.take(prefix + NORM_NAMES["input_layernorm"], (H,)),
        attn=attn,
        post_attention_layernorm=r.take(prefix + NORM_NAMES["post_attention_layernorm"], (H,)),
        moe=_moe(r, cfg, prefix, fused) if is_moe else None,
        mlp=None if is_moe else _mlp(r, {k: prefix + v for k, v in DENSE_NAMES.items()}, cfg.dense_intermediate, H),
    )


def _gqa(r: _Reader, a: GQAConfig, prefix: str) -> GQAWeights:
    H, ND, GD = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    shapes = {"q_proj": (ND, H), "k_proj": (GD, H), "v_proj": (GD, H), "o_proj": (H, ND)}
    if a.qkv_bias:
        shapes |= {"q_bias": (ND,), "k_bias": (GD,), "v_bias": (GD,)}
    if a.o_bias:
        shapes["o_bias"] = (H,)
    if a.qk_norm == "head":
        shapes |= {"q_norm": (a.head_dim,), "k_norm": (a.head_dim,)}
    elif a.qk_norm == "full":
        shapes |= {"q_norm": (ND,), "k_norm": (GD,)}
    return GQAWeights(**{k: r.take(prefix + GQA_NAMES[k], s, linear=k in LINEARS) for k, s in shapes.items()})


def _mla(r: _Reader, a: MLAConfig, prefix: str) -> MLAWeights:
    H, N, C, R = a.hidden_size, a.num_heads, a.kv_lora_rank, a.qk_rope_head_dim
    QK = N * (a.qk_nope_head_dim + R)
    shapes = {
        "kv_a_proj_with_mqa": (C + R, H),
        "kv_a_layernorm": (C,),
        "kv_b_proj": (N * (a.qk_nope_head_dim + a.v_head_dim), C),
        "o_proj": (H, N * a.v_head_dim),
    }
    if a.q_lora_rank is None:
        shapes["q_proj"] = (QK, H)
    else:
        shapes |= {"q_a_proj": (a.q_lora_rank, H), "q_a_layernorm": (a.q_lora_rank,), "q_b_proj": (QK, a.q_lora_rank)}
    if a.o_bias:
        shapes["o_bias"] = (H,)
    return MLAWeights(**{k: r.take(prefix + MLA_NAMES[k], s, linear=k in LINEARS) for k, s in shapes.items()})


def _mlp(r: _Reader, names: dict[str, str], width: int, hidden: int) -> MLPWeights:
    return MLPWeights(
        gate_proj=r.take(names["gate_proj"], (width, hidden), linear=True),
        up_proj=r.take(names["up_proj"], (width, hidden), linear=True),
        down_proj=r.take(names["down_proj"], (hidden, width), linear=True),
    )


def _moe(r: _Reader, cfg: ModelConfig, prefix: str, fused: bool) -> MoEWeights:
    family: Family = cfg.family_spec
    m, H = cfg.moe, cfg.hidden_size
    E, I = m.router.num_experts, m.expert_intermediate
    names = {k: prefix + v for k, v in family.moe_names(fused).items()}
    bias = names.get("e_score_correction_bias")
    router = RouterWeights(gate=r.take(names["gate"], (E, H)), e_score_correction_bias=r.take(bias, (E,)) if bias else None)
    if fused:
        gate_up = r.take(names["gate_up_proj"], (E, 2 * I, H), linear=True)
        down = r.take(names["down_proj"], (E, H, I), linear=True)
        # Views into the fused tensors: gate rows first, then up (transformers' Concatenate(dim=1) order).
        experts = [MLPWeights(*_halves(gate_up[e], I), down[e]) for e in range(E)]
    else:
        experts = [_mlp(r, {k: names[k].format(e=e) for k in DENSE_NAMES}, I, H) for e in range(E)]
    shared, shared_gate = None, None
    if m.shared_intermediate:
        shared_names = {k: prefix + v for k, v in family.shared_names.items()}
        shared = _mlp(r, shared_names, m.shared_intermediate, H)
        if m.shared_gate:
            shared_gate = r.take_plain(shared_names["shared_expert_gate"], (1, H))
    return MoEWeights(router=router, experts=experts, shared=shared, shared_expert_gate=shared_gate)


def _halves(gate_up: Tensor | BlockFp8, width: int) -> tuple[Tensor | BlockFp8, Tensor | BlockFp8]:
    """One expert's fused [2I, H] gate_up_proj as its gate [I, H] and up [I, H] rows."""
    if isinstance(gate_up, BlockFp8):
        return gate_up.rows(0, width), gate_up.rows(width, 2 * width)
    return gate_up[:width], gate_up[width:]


def _check_leftovers(store: TensorStore, cfg: ModelConfig, report: LoadReport) -> None:
    past_end = re.compile(r"model\.layers\.(\d+)\.")
    unexpected = []
    for name in sorted(set(store.file_of) - report.loaded - set(report.skipped)):
        m = past_end.match(name)
        if _ALWAYS_IGNORED.search(name) or (cfg.family_spec.skips_layers_past_end and m and int(m.group(1)) >= cfg.num_layers):
            report.skipped.append(name)
        else:
            unexpected.append(name)
    if unexpected:
        shown = ", ".join(repr(n) for n in unexpected[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{store.model_dir}: unexpected tensor(s) {shown} in {store.file_of[unexpected[0]].name}: "
            f"config.json ({cfg.family}, {cfg.num_layers} layers) does not use them; use the checkpoint's own config.json"
        )
