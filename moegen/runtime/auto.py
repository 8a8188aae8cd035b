"""What `--device auto` and `--dtype auto` (the defaults) mean, decided here and nowhere else.

device auto: cuda when torch sees a GPU and no --sim-link-gbps is given (a simulated link is the
cpu backend's), else cpu. A user on a GPU machine who sets no flag runs on the GPU, and is told.
dtype auto: on cuda the dtype the checkpoint's config.json names (what it was trained and shipped
in), bfloat16 when that is none moegen computes in; on cpu float32, which the cpu backend is tested
in token for token against transformers (bfloat16 is slower on CPUs without native bf16, and faster
on those with it: the plan says so at start when it is). Weights already loaded (an `Engine` handed
them) keep their own dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moegen.runtime.config import RuntimeConfig


def resolve_device(device: str, sim_link_gbps: float | None = None, say: Callable[[str], None] = lambda _: None
                   ) -> str:
    """`device` ("auto", "cpu" or "cuda") made concrete; an auto choice is told to `say` with its reason."""
    if device != "auto":
        return device
    if sim_link_gbps is not None:
        chosen, why = "cpu", "--sim-link-gbps simulates a link on the cpu backend"
    elif torch.cuda.is_available():
        chosen, why = "cuda", f"torch sees {torch.cuda.get_device_name(0)}"
    else:
        chosen, why = "cpu", "no GPU visible"
    say(f"device {chosen} (auto: {why})")
    return chosen


def resolve_dtype(rcfg: RuntimeConfig, model_dir: Path | None = None, loaded: torch.dtype | None = None,
                  say: Callable[[str], None] = lambda _: None) -> RuntimeConfig:
    """`rcfg` with --dtype auto made concrete for its (concrete) device and the checkpoint in `model_dir`,
    or the dtype of weights already `loaded`; told to `say`. A concrete dtype passes through."""
    from moegen.runtime.config import DTYPES

    if rcfg.dtype != "auto":
        return rcfg
    named = {v: k for k, v in DTYPES.items()}
    if loaded is not None:
        if loaded not in named:
            raise ValueError(f"--dtype auto: the weights given are {loaded}, which moegen doesn't compute in; "
                             f"load them in one of {', '.join(DTYPES)}")
        dtype, why = named[loaded], "the weights' own dtype"
    elif rcfg.device == "cpu":
        dtype, why = "float32", "float32 on cpu"
    else:
        given = None if model_dir is None else checkpoint_dtype(model_dir)
        dtype = given if given in DTYPES else "bfloat16"
        why = ("the checkpoint's dtype" if given in DTYPES else
               f"{model_dir}/config.json names {'no dtype' if given is None else f'dtype {given}'}, which moegen "
               "doesn't compute in; --dtype float16 or float32 chooses another")
    say(f"dtype {dtype} (auto: {why})")
    return replace(rcfg, dtype=dtype)


def checkpoint_dtype(model_dir: Path) -> str | None:
    """The dtype a checkpoint's config.json names (`dtype`, or `torch_dtype` as older transformers wrote
    it); None if it names none or can't be read (loading it then says what is wrong)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return value if isinstance(value, str) else None
