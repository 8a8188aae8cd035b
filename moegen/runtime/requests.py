"""What goes into the engine and what comes out, one per prompt."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field


@dataclass(slots=True)
class Request:
    prompt_ids: list[int]  # already tokenized
    max_new_tokens: int = 32
    _: KW_ONLY  # the rest by name only: a new field must never shift a positional argument
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0  # the request's own random stream: its tokens don't depend on the batch
    stop_token_ids: tuple[int, ...] = ()  # stop on these besides EOS
    stop_strings: tuple[str, ...] = ()  # stop once the decoded completion contains one (needs a detokenizer)
    ignore_eos: bool = False  # don't stop on the model's EOS ids
    id: object = None  # returned with the result; the request's index when None

    def __post_init__(self):
        if not self.prompt_ids:
            raise ValueError(f"request {self.id!r}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"request {self.id!r}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


@dataclass(slots=True)
class Result:
    id: object
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # generated ids only
    finish_reason: str = "length"  # "stop" (EOS or a stop id) or "length"
