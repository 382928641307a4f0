"""Fidelity of a reuse method against a dense prefill of the same tokens, and ratio calibration."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from blending.decode import SamplingParams
from blending.engine import Engine, PrefillRequest, PrefillResult


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced top-1 agreement with dense and mean KL(dense || method) over the dense answer."""

    agreement: float
    kl: float
    tokens: int


def dense_answer(engine: Engine, request: PrefillRequest, max_tokens: int) -> tuple[PrefillResult, torch.Tensor]:
    """Dense prefill and its greedy answer (token ids), the reference every method is compared with."""
    dense = engine.prefill(PrefillRequest(request.segments, request.namespace, mode="dense"))
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=(eos,) if eos is not None else ())
    return dense, torch.tensor([t for t, _ in engine.generate(dense, params)], dtype=torch.int64)


def fidelity(engine: Engine, result: PrefillResult, dense_logits: torch.Tensor, answer: torch.Tensor) -> Fidelity:
    """Compare ``result`` with the dense logits over the dense answer tokens."""
    logits = engine.score(result, answer)
    agree = float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    kl = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True, reduction="none")
    return Fidelity(agree, float(kl.sum(-1).mean()), len(answer))


@dataclass(frozen=True)
class Calibration:
    """The smallest recompute ratio whose mean agreement reaches ``target`` on the calibration set."""

    fingerprint: str
    target: float
    ratio: float
    measured: dict[str, float]  # ratio -> mean agreement
    reached: bool

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> Calibration:
        return cls(**json.loads(path.read_text()))


def calibrate_ratio(
    engine: Engine,
    requests: Sequence[PrefillRequest],
    target: float,
    ratios: Sequence[float] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0),
    answer_tokens: int = 10,
    prepare: Callable[[PrefillRequest], None] | None = None,
) -> Calibration:
    """Measure agreement per ratio on ``requests`` (their chunks must be cached, or ``prepare`` caches
    them) and pick the smallest ratio that reaches ``target``; 1.0 (exact) when none below does."""
    if not 0.0 < target <= 1.0:
        raise ValueError("the fidelity target is an agreement in (0, 1]")
    scores: dict[float, list[float]] = {r: [] for r in ratios}
    for request in requests:
        if prepare is not None:
            prepare(request)
        dense, answer = dense_answer(engine, request, answer_tokens)
        if len(answer) == 0:
            continue
        reference = engine.score(dense, answer)
        for ratio in ratios:
            result = engine.prefill(PrefillRequest(request.segments, request.namespace, "blend", ratio))
            scores[ratio].append(fidelity(engine, result, reference, answer).agreement)
    measured = {str(r): sum(v) / len(v) for r, v in scores.items() if v}
    chosen = next((r for r in sorted(ratios) if measured.get(str(r), 0.0) >= target), None)
    return Calibration(engine.fingerprint, target, chosen if chosen is not None else 1.0, measured, chosen is not None)
