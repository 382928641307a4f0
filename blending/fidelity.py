"""Fidelity of a reuse method against a dense prefill of the same tokens (kept answers, top-1 agreement,
KL) and the calibration of ``auto``'s recompute budgets."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from blending.calibration import SYSTEM_NAMESPACE, Calibration, calibration_prompts, document_segments, new_order
from blending.decode import SamplingParams, follows
from blending.engine import Engine, PrefillRequest, PrefillResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    """Teacher-forced top-1 agreement with dense and mean KL(dense || method) over the dense answer."""

    agreement: float
    kl: float
    tokens: int


def dense_answer(engine: Engine, request: PrefillRequest, max_tokens: int) -> tuple[PrefillResult, torch.Tensor]:
    """Dense prefill and its greedy answer (token ids), the reference every method is compared with."""
    dense = engine.prefill(PrefillRequest(request.segments, request.namespace, mode="dense"))
    return dense, greedy_answer(engine, dense, max_tokens)


def greedy_answer(engine: Engine, result: PrefillResult, max_tokens: int) -> torch.Tensor:
    """The greedy continuation of ``result`` (token ids, stop token excluded)."""
    params = SamplingParams.greedy(engine.tokenizer, max_tokens)
    ids = [t for t, _ in engine.generate(result, params) if t not in params.stop_token_ids]
    return torch.tensor(ids, dtype=torch.int64)


def fidelity(engine: Engine, result: PrefillResult, dense_logits: torch.Tensor, answer: torch.Tensor) -> Fidelity:
    """Compare ``result`` with the dense logits over the dense answer tokens."""
    logits = engine.score(result, answer)
    agree = float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean())
    kl = F.kl_div(logits.log_softmax(-1), dense_logits.log_softmax(-1), log_target=True, reduction="none")
    return Fidelity(agree, float(kl.sum(-1).mean()), len(answer))


def keeps_answer(engine: Engine, result: PrefillResult, answer: torch.Tensor, max_tokens: int) -> bool:
    """Whether the greedy answer decoded from ``result`` equals ``answer`` (dense's greedy answer of up to
    ``max_tokens`` tokens, stop token excluded) token for token, ending where it ends. Decoding stops at
    the first differing token."""
    params = SamplingParams.greedy(engine.tokenizer, max_tokens)
    return follows(engine.generate(result, params), answer.tolist(), params.stop_token_ids)


DEFAULT_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def measure_curve(
    engine: Engine,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    prompts: int = 8,
    docs: int = 6,
    answer_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Calibration:
    """Kept answers (and, for information, top-1 agreement) per recompute budget on the built-in
    calibration workload: each prompt's documents are computed once in one order (a dense prefill and its
    write-back, as production traffic leaves them), then asked in a new order; every budget's greedy answer
    of up to ``answer_tokens`` tokens is compared with a dense prefill's of the new prompt. Runs in the
    reserved namespace, never a tenant's."""
    if not ratios or any(not 0.0 <= r <= 1.0 for r in ratios):
        raise ValueError("ratios must lie within [0, 1]")
    rng = random.Random(seed)
    kept: dict[float, list[float]] = {float(r): [] for r in ratios}
    agreement: dict[float, list[float]] = {float(r): [] for r in ratios}
    items = calibration_prompts(prompts, docs=docs, seed=seed)
    for i, (documents, question, system) in enumerate(items):
        ns = f"{SYSTEM_NAMESPACE}/calibration/{seed}/{i}"
        warm = document_segments(engine.tokenizer, system, documents, question)
        engine.writeback(engine.prefill(PrefillRequest(warm, ns, "dense")))
        moved = [documents[j] for j in new_order(len(documents), rng)]
        segments = document_segments(engine.tokenizer, system, moved, question)
        dense, answer = dense_answer(engine, PrefillRequest(segments, ns + "/reference"), answer_tokens)
        reference = engine.score(dense, answer) if len(answer) else None
        for r in kept:
            result = engine.prefill(PrefillRequest(segments, ns, "blend", r))
            kept[r].append(float(keeps_answer(engine, result, answer, answer_tokens)))
            if reference is not None:
                agreement[r].append(fidelity(engine, result, reference, answer).agreement)
        if progress is not None:
            progress(i + 1, len(items))
    return Calibration(engine.fingerprint, _means(kept), len(items), _means(agreement), answer_tokens)


def _means(scores: dict[float, list[float]]) -> dict[float, float]:
    return {r: sum(v) / len(v) for r, v in scores.items() if v}


def calibrate_in_background(engine: Engine, **kwargs: Any) -> threading.Thread:
    """Measure the curve in a daemon thread (its prefills take turns with requests on the model lock)
    and persist it; ``auto`` runs exact-only until it lands. Failures are logged, never raised."""

    def work() -> None:
        try:
            engine.set_calibration(measure_curve(engine, **kwargs))
            log.info("calibration for %s persisted", engine.fingerprint)
        except Exception:
            log.exception("background calibration failed; auto stays exact-only")

    thread = threading.Thread(target=work, name="kvfuse-calibration", daemon=True)
    thread.start()
    return thread
