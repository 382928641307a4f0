"""The online fidelity guard: a sample of approximate-reuse requests is re-run dense in the background,
when the engine is idle, and the running share of kept answers (the sampled KV's greedy answer equals the
dense prefill's, token for token) per tenant and mode steers ``auto``; top-1 agreement is kept beside it.

Never on a request's critical path: sampling keeps a reference to the request's fused KV (bounded per
tenant) and a worker thread does the dense run later. Per tenant throughout (own sampling stream, own
queue quota, own running scores), so one tenant's traffic never changes another's budget.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from blending.decode import SamplingParams, follows, generate_tokens, teacher_forced_logits
from blending.fused import FusedKV

if TYPE_CHECKING:
    from blending.engine import Engine, PrefillResult
    from blending.planner import Plan
    from blending.prompt_cache import PrefixHit

log = logging.getLogger(__name__)
APPROXIMATE = ("blend", "naive", "anchor", "hybrid")


@dataclass(frozen=True)
class GuardConfig:
    """``sample_rate``: share of approximate-reuse requests re-run dense; ``answer_tokens``: the length of
    the greedy answers compared; ``window``: scores kept per tenant and mode; ``min_samples`` before the
    guard acts; ``recover_margin``: share of kept answers above the target needed to lower the budget
    again. ``min_evidence``: shadow comparisons (see :mod:`blending.policy`) a tenant needs to earn a
    budget."""

    sample_rate: float = 0.02
    answer_tokens: int = 32
    window: int = 20
    min_samples: int = 3
    max_pending_per_tenant: int = 2
    recover_margin: float = 0.02
    min_evidence: int = 20
    idle_s: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError("sample_rate must be within [0, 1]")


@dataclass(frozen=True)
class Shadow:
    """A request that ran exact-only for want of evidence: its plan (with the cached KV it found) and hot
    prompt-cache hit, to blend at ``ratio`` in the background and compare with its exact answer."""

    plan: Plan
    hot: PrefixHit | None
    ratio: float


@dataclass
class _Sample:
    namespace: str
    mode: str
    token_ids: torch.Tensor
    fused: FusedKV  # the request's KV: approximate, or for a shadow the exact reference
    shadow: Shadow | None = None


class FidelityGuard:
    def __init__(self, engine: Engine, config: GuardConfig) -> None:
        self.engine, self.config = engine, config
        self._lock = threading.Condition()
        self._queue: deque[_Sample] = deque()
        self._pending: dict[str, int] = defaultdict(int)
        self._rngs: dict[str, random.Random] = {}
        self._scores: dict[tuple[str, str], deque[tuple[float, float]]] = {}  # reported: (kept, agreement)
        self._evidence: dict[tuple[str, str], deque[float]] = {}  # since the budget last changed
        self._escalation: dict[str, int] = defaultdict(int)
        self._shadows: dict[str, deque[float]] = {}  # kept answers of shadow blends, per tenant
        self._earned: dict[str, float] = {}  # the budget each tenant earned from them
        self._busy = 0
        self._worker: threading.Thread | None = None
        self.checked = 0

    def offer(self, result: PrefillResult) -> bool:
        """Sample ``result`` for a background check (True when taken): an approximate result against a dense
        re-run, or an exact-only one that names a shadow budget against a blend at that budget."""
        shadow = None if result.mode in APPROXIMATE else result.shadow
        if (result.mode not in APPROXIMATE and shadow is None) or self.config.sample_rate <= 0.0:
            return False
        ns = result.namespace
        with self._lock:
            rng = self._rngs.setdefault(ns, random.Random(zlib.crc32(ns.encode())))
            if rng.random() >= self.config.sample_rate or self._pending[ns] >= self.config.max_pending_per_tenant:
                return False
            self._pending[ns] += 1
            mode = "shadow" if shadow is not None else result.mode
            self._queue.append(_Sample(ns, mode, result.fused.token_ids, result.fused, shadow))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="kvfuse-guard", daemon=True)
                self._worker.start()
            self._lock.notify_all()
        return True

    def escalation(self, namespace: str) -> int:
        """Budget steps ``auto`` adds for this tenant (0 while its kept answers meet the target)."""
        with self._lock:
            return self._escalation[namespace]

    def earned(self, namespace: str) -> float | None:
        """The budget this tenant's shadow comparisons kept enough answers at (None: not earned)."""
        with self._lock:
            return self._earned.get(namespace)

    def snapshot(self, namespace: str | None = None) -> dict[str, dict[str, Any]]:
        """Running share of kept answers and top-1 agreement per mode (one tenant's, or pooled over all when
        ``namespace`` is None)."""
        with self._lock:
            pooled: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for (ns, mode), scores in self._scores.items():
                if namespace is None or ns == namespace:
                    pooled[mode].extend(scores)
        return {m: {"same_answer": sum(k for k, _ in v) / len(v), "agreement": sum(a for _, a in v) / len(v),
                    "samples": len(v)} for m, v in pooled.items() if v}

    def drain(self, timeout_s: float = 120.0) -> None:
        """Wait until every sampled request has been checked (benchmarks and tests)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._busy:
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError("fidelity guard still busy")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    if not self._lock.wait(timeout=30.0):
                        self._worker = None
                        return
                sample = self._queue.popleft()
                self._busy += 1
            try:
                self._wait_idle()
                if sample.shadow is not None:
                    scores = self._check_shadow(sample, sample.shadow)
                    if scores is not None:
                        self._record_shadow(sample, sample.shadow.ratio, *scores)
                else:
                    self._record(sample, *self._check(sample))
            except Exception:  # a failed check must never take the service down
                log.exception("fidelity guard check failed")
            finally:
                with self._lock:
                    self._busy -= 1
                    self._pending[sample.namespace] -= 1
                    self._lock.notify_all()

    def _wait_idle(self) -> None:
        while self.engine.inflight > 0:
            time.sleep(self.config.idle_s)

    def _check(self, sample: _Sample) -> tuple[float, float]:
        """(1.0 when the sampled KV's greedy answer equals a dense prefill's, else 0.0; top-1 agreement with
        the dense logits over the dense answer)."""
        with self.engine.model_lock:
            return self._compare(self.engine._dense(sample.token_ids), sample.fused)

    def _check_shadow(self, sample: _Sample, shadow: Shadow) -> tuple[float, float] | None:
        """The shadow blend's answer against the request's exact one (None when the blend fell back)."""
        with self.engine.model_lock:
            fused, mode, _ = self.engine._compute(shadow.plan, shadow.hot, "blend", None, shadow.ratio)
            return self._compare(sample.fused, fused) if mode == "blend" else None

    def _compare(self, reference: FusedKV, fused: FusedKV) -> tuple[float, float]:
        """(kept answer, top-1 agreement) of ``fused`` against ``reference`` (caller holds the model lock)."""
        engine = self.engine
        params = SamplingParams.greedy(engine.tokenizer, self.config.answer_tokens)
        answer = torch.tensor([t for t, _ in generate_tokens(engine.model, reference, params)
                               if t not in params.stop_token_ids], dtype=torch.int64)
        kept = float(follows(generate_tokens(engine.model, fused, params), answer.tolist(), params.stop_token_ids))
        if len(answer) == 0:
            return kept, float(int(torch.argmax(reference.last_logits)) == int(torch.argmax(fused.last_logits)))
        ref = teacher_forced_logits(engine.model, reference, answer)
        got = teacher_forced_logits(engine.model, fused, answer)
        return kept, float((ref.argmax(-1) == got.argmax(-1)).float().mean())

    def _record_shadow(self, sample: _Sample, ratio: float, kept: float, agreement: float) -> None:
        target = self.engine.config.policy.fidelity_target
        with self._lock:
            self.checked += 1
            ns = sample.namespace
            self._scores.setdefault((ns, "shadow"), deque(maxlen=self.config.window)).append((kept, agreement))
            evidence = self._shadows.setdefault(ns, deque(maxlen=self.config.window))
            evidence.append(kept)
            if len(evidence) >= self.config.min_evidence and sum(evidence) / len(evidence) >= target:
                if ns not in self._earned:
                    log.info("guard: %s earned blend %.2f (%d of %d shadow answers kept)", ns, ratio,
                             sum(evidence), len(evidence))
                self._earned[ns] = ratio
            elif len(evidence) >= self.config.min_evidence:
                self._earned.pop(ns, None)

    def _record(self, sample: _Sample, kept: float, agreement: float) -> None:
        target = self.engine.config.policy.fidelity_target
        with self._lock:
            self.checked += 1
            key = (sample.namespace, sample.mode)
            self._scores.setdefault(key, deque(maxlen=self.config.window)).append((kept, agreement))
            scores = self._evidence.setdefault(key, deque(maxlen=self.config.window))
            scores.append(kept)
            if len(scores) < self.config.min_samples:
                return
            mean = sum(scores) / len(scores)
            ns = sample.namespace
            if mean < target:
                self._escalation[ns] += 1
                scores.clear()  # judge the raised budget on fresh evidence
                log.warning("guard: %.0f%% of answers kept < %.0f%% for %s; raising the budget", 100 * mean,
                            100 * target, sample.mode)
                self._earned.pop(ns, None)  # an earned budget is earned again, on fresh evidence
                self._shadows.pop(ns, None)
            elif self._escalation[ns] and mean >= target + self.config.recover_margin:
                self._escalation[ns] -= 1
                scores.clear()

