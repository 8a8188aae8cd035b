"""What an engine actor is built from: the model, the same runtime and sampling options as serve-offline,
and how Ray places and feeds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moegen.io.dataset import Fields
from moegen.io.prompts import Defaults
from moegen.runtime.config import RuntimeConfig


@dataclass(frozen=True, slots=True)
class MoegenConfig:
    """One engine per actor, `engines` actors.

    Continuous batching across Ray's batches: each actor runs `calls_per_engine` batches of `batch_rows`
    rows at once, all feeding one engine stream, so when one batch is down to its last sequences the
    others' prompts keep the engine's B sequences in flight; keep batch_rows x calls_per_engine at least
    twice the planned B (the actor says so when it isn't)."""

    model_dir: Path
    runtime: RuntimeConfig = RuntimeConfig()
    device: str = "auto"  # decided on each engine's node (`runtime.device` was decided where it was made) ...
    dtype: str = "auto"  # ... and so is the dtype, against that device
    plan: frozenset[str] | None = frozenset()  # the runtime knobs kept as given, the rest planned; None: none planned
    workload: object | None = None  # the job's `planner.cost.Workload` per engine; None: each engine's first batch
    defaults: Defaults = Defaults()  # sampling, which a row's own fields override
    fields: Fields = Fields(id="id")  # the rows' prompt, messages and id columns
    chat_template: str | None = None  # Jinja text, instead of the tokenizer's
    output_format: str = "moegen"  # or "openai": the record each output row carries, as serve-offline writes it
    token_ids: bool = False  # also the completion's token ids in the record
    source: str = "the Ray dataset"  # names the input in error records
    engines: int = 1
    batch_rows: int = 128
    calls_per_engine: int = 4
    num_gpus: float = 0.0  # per engine actor (1 on a GPU cluster)
    num_cpus: float = 1.0  # per engine actor; fractional on a small CPU node, so Ray's own tasks still run
    torch_threads: int | None = None  # intra-op threads of an engine [default: its CPUs, at least 1]
    extra: dict = field(default_factory=dict)  # more `map_batches` keyword arguments (e.g. runtime_env)

    def __post_init__(self):
        for name in ("engines", "batch_rows", "calls_per_engine"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoegenConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.output_format not in ("moegen", "openai"):
            raise ValueError(f"MoegenConfig.output_format must be 'moegen' or 'openai', got {self.output_format!r}")
        if not Path(self.model_dir).is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such model directory (MoegenConfig.model_dir); pass a "
                                    "checkpoint directory (one with config.json)")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, int(self.num_cpus))
