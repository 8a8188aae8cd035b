"""The parity rule: do moegen's greedy tokens match an oracle's (transformers, or the reference model)?

Tokens must be equal. Where they diverge, the run still passes if, at the first divergence, the
oracle's logits for the two tokens differ by less than `tie_tol` × max|logit| (a float-rounding
near-tie), and the divergence is reported. Wherever both runs saw the same tokens, per-position
logits must agree within `logit_tol` × max|logit|.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

TIE_TOL = 1e-5
LOGIT_TOL = 1e-4


@dataclass(slots=True)
class ParityResult:
    ok: bool
    divergence: int | None  # first generated position where the tokens differ, None if equal
    near_tie: bool  # the divergence is a float near-tie in the oracle's logits
    max_logit_error: float  # max over compared positions of max|ours - oracle| / max|oracle|
    detail: str  # one line for a report
    gap: float | None = None  # at the divergence: |oracle logit of our token - of its own| / max|logit|


def compare_greedy(ours: list[int], oracle: list[int], ours_logits: list[Tensor] | None = None,
                   oracle_logits: list[Tensor] | None = None, tie_tol: float = TIE_TOL,
                   logit_tol: float = LOGIT_TOL) -> ParityResult:
    """Apply the parity rule to one completion; logits are [V] per generated position."""
    common = min(len(ours), len(oracle))
    divergence = next((i for i in range(common) if ours[i] != oracle[i]), None)
    if divergence is None and len(ours) != len(oracle):
        return ParityResult(False, common, False, 0.0,
                            f"lengths differ ({len(ours)} vs oracle {len(oracle)}) with equal tokens up to {common}")
    error, near_tie, gap = 0.0, False, None
    if ours_logits is not None and oracle_logits is not None:
        last = common - 1 if divergence is None else divergence  # same prefix up to and including here
        for i in range(last + 1):
            ref = oracle_logits[i].float()
            error = max(error, float((ours_logits[i].float() - ref).abs().max() / ref.abs().max()))
    if divergence is not None and oracle_logits is not None:  # the near-tie needs the oracle's logits only
        ref = oracle_logits[divergence].float()
        gap = float((ref[ours[divergence]] - ref[oracle[divergence]]).abs() / ref.abs().max())
        near_tie = gap < tie_tol
    logits_ok = error <= logit_tol
    ok = logits_ok and (divergence is None or near_tie)
    if divergence is None:
        detail = f"{len(ours)} tokens equal; max logit error {error:.1e}"
    else:
        kind = "near-tie (accepted)" if near_tie else "NOT a near-tie"
        detail = (f"diverged at token {divergence} ({ours[divergence]} vs oracle {oracle[divergence]}): {kind}; "
                  f"max logit error {error:.1e}")
    if not logits_ok:
        detail += f" > tolerance {logit_tol:.0e}"
    return ParityResult(ok, divergence, near_tie, error, detail, gap)
