"""The embedded engine: plan a prompt, fetch chunk KV, blend or prefill, decode, write new KV back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from blending.accounting import ReuseReport
from blending.adapter import ModelAdapter, UnsupportedModelError
from blending.anchor_flow import Computed, anchor_inputs, anchor_prefill
from blending.anchor_origins import OriginRegistry
from blending.anchor_store import AnchorStore
from blending.anchors import AnchorConfig, AnchorPool
from blending.cacheblend import BlendConfig, blend
from blending.calibration import Calibration, CalibrationStore
from blending.decode import SamplingParams, dense_prefill, generate_tokens, teacher_forced_logits
from blending.fused import FusedKV, Reuse, SegmentInput
from blending.guard import FidelityGuard, GuardConfig, Shadow
from blending.lookup import KVValidator, exact_inputs, exact_length, lookup_hot, lookup_store
from blending.model import LoadedModel
from blending.planner import MODES, KeySpaces, Mode, Plan, PromptSegment, make_plan
from blending.policy import TARGET_RANGE, Decision, Features, PolicyConfig, decide
from blending.prompt_cache import HotPromptCache, PrefixHit
from blending.scheduler import FairLock, current_queue_s
from blending.writeback import (
    publish_bases,
    publish_computed,
    remember,
    segment_starts,
    warm_chunks,
    write_back,
)
from kvstore.chunk import dtype_name
from kvstore.keys import ChunkKey
from kvstore.store import TieredStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    """Defaults of the embedded engine (each request may override mode and ratio).

    ``shared_prefix``: precompute chunks after the request's system prefix (APE-style) rather than alone.
    ``max_prompt_tokens``: longer prompts are refused by :meth:`Engine.prefill`.
    """

    blend: BlendConfig = field(default_factory=BlendConfig)
    shared_prefix: bool = True
    min_chunk_tokens: int = 8
    max_prompt_tokens: int = 8192
    writeback: bool = True
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    hybrid_ratio: float = 0.1
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    hot_bytes_per_namespace: int = 512 << 20  # the hot prompt cache (immediate reuse), per tenant


@dataclass(frozen=True)
class PrefillRequest:
    segments: tuple[PromptSegment, ...]
    namespace: str = "default"
    mode: Mode = "auto"
    recompute_ratio: float | None = None
    fidelity_target: float | None = None  # auto's agreement target; None: the engine's policy default


@dataclass
class PrefillResult:
    fused: FusedKV
    mode: str  # the mode actually used
    fallback_reason: str | None
    ttft_s: float  # planning, store load and prefill up to the first token's logits
    plan: Plan
    chunk_hits: int = 0
    chunk_misses: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    requested_mode: str = "auto"
    namespace: str = "default"
    exact_len: int = 0  # leading tokens whose KV equals a dense prefill's
    queue_s: float = field(default_factory=current_queue_s)  # waited for the model before the prefill ran
    shadow: Shadow | None = None  # auto ran exact-only for want of evidence: the guard may blend it aside

    def report(self) -> ReuseReport:
        """The token accounting (checked: it adds up to ``prompt_tokens``), mode, TTFT and queue time."""
        return ReuseReport(
            **self.fused.stats.tokens(),
            mode=self.mode,
            requested_mode=self.requested_mode,
            fallback_reason=self.fallback_reason,
            ttft_ms=round(self.ttft_s * 1000, 3),
            queue_ms=round(self.queue_s * 1000, 3),
            chunk_hits=self.chunk_hits,
            chunk_misses=self.chunk_misses,
        )

    def summary(self) -> dict[str, object]:
        return self.report().model_dump()


class PromptTooLongError(ValueError):
    pass


class Engine:
    """Thread-safe: store I/O runs concurrently, model execution is serialized by one lock."""

    def __init__(self, loaded: LoadedModel, store: TieredStore, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.store = store
        self.config = config or EngineConfig()
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.fingerprint = loaded.fingerprint
        self.model_lock = FairLock()  # fair across tenants; long computations yield between chunks
        self.adapter: ModelAdapter | None
        self.unsupported_reason: str | None = None
        try:
            self.adapter = ModelAdapter(loaded.model)
        except UnsupportedModelError as exc:  # serve dense through HF only
            self.adapter, self.unsupported_reason = None, str(exc)
        self.layout = self._layout()
        self.anchor_pool: AnchorPool | None = None
        self.anchor_origins: OriginRegistry | None = None  # where this instance's published bases came from
        if self.adapter is not None:
            persist = AnchorStore(store, self.fingerprint, self.layout)
            self.anchor_pool = AnchorPool(self.adapter.inv_freq, self.config.anchors, persist)
            self.anchor_origins = OriginRegistry(self.config.anchors.max_origins)
            bad = [c for c in self.config.blend.check_layers if c >= self.adapter.shape.num_layers]
            if bad:
                raise ValueError(
                    f"check_layers {bad} do not exist: the model has {self.adapter.shape.num_layers} layers")
        layers = self.adapter.shape.num_layers if self.adapter is not None else None
        self._validator = KVValidator(self.fingerprint, self.model.dtype, layers)
        self.inflight = 0
        self._inflight_lock = threading.Lock()
        self.hot = HotPromptCache(self.config.hot_bytes_per_namespace)
        self.calibrations = CalibrationStore(store, self.fingerprint, self.layout) if self.adapter else None
        self._calibration: Calibration | None = None
        self.on_uncalibrated: Callable[[Engine], object] | None = None
        self.guard: FidelityGuard | None = FidelityGuard(self, self.config.guard) if self.adapter else None

    def _layout(self) -> str:
        cfg = self.model.config.get_text_config(decoder=True)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return (
            f"l{cfg.num_hidden_layers}h{cfg.num_key_value_heads}d{head_dim}:{dtype_name(self.model.dtype)}"
        )

    def spaces(self, namespace: str) -> KeySpaces:
        return KeySpaces(self.fingerprint, self.layout, namespace)

    def tokenize(self, text: str) -> torch.Tensor:
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def plan(self, segments: Sequence[PromptSegment], namespace: str, shared_prefix: bool | None = None) -> Plan:
        """Tokenize and key the segments."""
        tokens = [(s.kind, self.tokenize(s.text)) for s in segments]
        return make_plan(
            tokens,
            self.spaces(namespace),
            shared_prefix=self.config.shared_prefix if shared_prefix is None else shared_prefix,
            min_chunk_tokens=self.config.min_chunk_tokens,
        )

    def _anchor_plan(self, segments: Sequence[PromptSegment], namespace: str) -> Plan:
        """Anchor modes key chunks by their anchor base (KV from the first context that computed them)."""
        plan = self.plan(segments, namespace, shared_prefix=False)
        spaces = self.spaces(namespace)
        for seg in plan.segments:
            if seg.kind == "chunk" and seg.key is not None:
                seg.key, seg.fallback_key = spaces.base_key(seg.token_ids), None
        plan.anchored = True
        return plan

    def _lookup(self, plan: Plan) -> None:
        lookup_store(self.store, plan, self._validator)

    def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Plan, look up and fuse the prompt's KV; falls back to a dense prefill with a reason.

        ``auto`` asks :mod:`blending.policy`; exact reuse (cached prefix, the hot prompt cache) is used by
        every mode but ``dense``, which is the reference and reuses nothing. A sample of approximate
        results is handed to the fidelity guard."""
        with self._inflight_lock:
            self.inflight += 1
        try:
            result = self._prefill(request)
        finally:
            with self._inflight_lock:
                self.inflight -= 1
        if self.guard is not None:
            self.guard.offer(result)
        return result

    def _prefill(self, request: PrefillRequest) -> PrefillResult:
        if request.mode not in MODES:
            raise ValueError(f"unknown mode {request.mode!r}; choose one of {', '.join(MODES)}")
        start = time.perf_counter()
        target = request.fidelity_target if request.fidelity_target is not None else self.config.policy.fidelity_target
        if not 0.0 < target <= 1.0:
            raise ValueError(TARGET_RANGE)
        anchored = request.mode in ("anchor", "hybrid")
        plan = self._anchor_plan(request.segments, request.namespace) if anchored else self.plan(
            request.segments, request.namespace)
        if plan.num_tokens == 0:
            raise ValueError("the prompt is empty")
        if plan.num_tokens > self.config.max_prompt_tokens:
            raise PromptTooLongError(
                f"prompt has {plan.num_tokens} tokens; the limit is {self.config.max_prompt_tokens}"
            )
        mode: str = request.mode
        ratio, reason = request.recompute_ratio, None
        hot: PrefixHit | None = None
        if self.adapter is None:
            mode, reason = "dense", f"model not supported for reuse: {self.unsupported_reason}"
        elif mode != "dense":
            self._lookup(plan)
            if not plan.anchored:  # anchor modes start from bases, with their origins
                hot = lookup_hot(self.hot, plan, request.namespace, self._validator)
        limit = self.adapter.max_reuse_positions if self.adapter is not None else None
        if mode != "dense" and limit is not None and plan.num_tokens > limit:
            mode, reason, hot = "dense", "dynamic rope: positions beyond the trained length", None
            plan = self.plan(request.segments, request.namespace)
        bases: Plan | None = None  # auto: the anchor plan whose missing bases this request can publish
        shadow: Shadow | None = None
        if mode == "auto":
            decision, plan, bases = self._decide(plan, hot, request, target)
            mode, ratio, reason = decision.mode, decision.ratio, decision.reason
            shadow = Shadow(plan, hot, decision.shadow) if decision.shadow is not None else None
        elif mode in ("blend", "naive") and plan.hits == 0 and hot is None:
            mode, reason = "dense", "no cached KV for any segment"
        t_lookup = time.perf_counter()
        with self.model_lock:
            if mode in ("anchor", "hybrid"):
                # A base published by a request that held the lock before us is used, not computed again.
                if plan.misses:
                    self._lookup(plan)
                fused, mode, anchor_reason, computed = self._anchor(plan, mode, ratio, request.namespace)
                reason = anchor_reason or (reason if request.mode == "auto" else None)
                if computed and self.config.writeback and self.anchor_origins is not None:
                    publish_computed(self.store, self.anchor_origins, computed, request.namespace)
                exact_len = exact_length(plan, fused, mode, hot)
            else:
                fused, mode, reason = self._compute(plan, hot, mode, reason, ratio)
                exact_len = exact_length(plan, fused, mode, hot)
                if bases is not None and self.anchor_origins is not None and self.config.writeback:
                    publish_bases(self.store, self.anchor_origins, bases, fused, exact_len, request.namespace,
                                  self.fingerprint)
        end = time.perf_counter()
        if mode == "dense" and reason:
            log.info("dense fallback: %s", reason)
        if self.adapter is not None and self.config.writeback and request.mode != "dense":
            remember(self.hot, plan, fused, exact_len, request.namespace, self.fingerprint)
        keyed = [s for s in plan.segments if s.key is not None]
        return PrefillResult(
            fused=fused,
            mode=mode,
            fallback_reason=reason,
            ttft_s=end - start,
            plan=plan,
            chunk_hits=sum(1 for s in keyed if s.cached is not None),
            chunk_misses=sum(1 for s in keyed if s.cached is None),
            timings={"lookup": t_lookup - start, "compute": end - t_lookup},
            requested_mode=request.mode,
            namespace=request.namespace,
            exact_len=exact_len,
            shadow=shadow,
        )

    def _decide(self, plan: Plan, hot: PrefixHit | None, request: PrefillRequest, target: float
                ) -> tuple[Decision, Plan, Plan | None]:
        """``auto``: the policy's choice, the plan to run it on (the anchor plan for hybrid), and the anchor
        plan when shared segments lack a base (the request publishes them for the next agents)."""
        assert self.adapter is not None
        exact = max(plan.exact_prefix_tokens, hot.length if hot is not None else 0)
        cached = sum(len(s.token_ids) for s, i in zip(plan.segments, segment_starts(plan), strict=True)
                     if s.kind == "chunk" and s.cached is not None and i >= exact)
        base_tokens, anchor_plan = 0, None
        chunks = [s for s in plan.segments if s.kind == "chunk" and s.key is not None]
        if chunks and cached < sum(len(s.token_ids) for s in chunks) and self.anchor_pool is not None:
            anchor_plan = self._anchor_plan(request.segments, request.namespace)
            self._lookup(anchor_plan)
            base_tokens = anchor_plan.cached_chunk_tokens
        features = Features(plan.num_tokens, exact, cached, base_tokens, self.adapter.shape.num_layers,
                            len(self.config.blend.check_layers))
        guard, ns = self.guard, request.namespace
        decision = decide(features, self.config.policy, target, self.calibration(),
                          guard.escalation(ns) if guard else 0, guard.earned(ns) if guard else None)
        if decision.mode == "hybrid" and anchor_plan is not None:
            return decision, anchor_plan, None
        return decision, plan, anchor_plan if anchor_plan is not None and anchor_plan.misses else None

    def calibration(self) -> Calibration | None:
        """The model's persisted calibration curve (read from the store once, then kept). When there is
        none, ``on_uncalibrated`` (e.g. a background calibration the server starts) is called once."""
        if self._calibration is None and self.calibrations is not None:
            self._calibration = self.calibrations.load()
            if self._calibration is None and self.on_uncalibrated is not None:
                hook, self.on_uncalibrated = self.on_uncalibrated, None
                hook(self)
        return self._calibration

    def set_calibration(self, cal: Calibration) -> None:
        """Persist ``cal`` under the model fingerprint and use it from now on."""
        if self.calibrations is None:
            raise UnsupportedModelError(self.unsupported_reason or "model not supported")
        self.calibrations.save(cal)
        self._calibration = cal

    def _anchor(
        self, plan: Plan, mode: str, ratio: float | None, namespace: str
    ) -> tuple[FusedKV, str, str | None, list[Computed]]:
        assert self.adapter is not None and self.anchor_pool is not None and self.anchor_origins is not None
        hybrid = None
        if mode == "hybrid":
            hybrid = replace(self.config.blend, recompute_ratio=self.config.hybrid_ratio if ratio is None else ratio)
        try:
            out = anchor_prefill(self.adapter, self.anchor_pool, self.anchor_origins, anchor_inputs(plan), hybrid,
                                 self._dense, self.fingerprint, namespace=namespace)
        except (ValueError, RuntimeError) as exc:  # bad cached KV or anchors must never crash a request
            log.warning("anchor prefill failed (%s); dense fallback", exc)
            return self._dense(plan.token_ids), "dense", f"anchor failed: {exc}", []
        return out.fused, "dense" if out.reason else mode, out.reason, out.computed

    def _compute(
        self, plan: Plan, hot: PrefixHit | None, mode: str, reason: str | None, ratio: float | None
    ) -> tuple[FusedKV, str, str | None]:
        if mode == "dense":
            return self._dense(plan.token_ids), mode, reason
        assert self.adapter is not None
        inputs = exact_inputs(plan, hot)
        if mode == "prefix" or not any(i.reuse is Reuse.CACHED for i in inputs):
            mode = "prefix" if inputs[0].reuse is Reuse.EXACT else "dense"
            inputs = [i if i.reuse is Reuse.EXACT else SegmentInput(i.token_ids) for i in inputs]
            if mode == "dense":
                return self._dense(plan.token_ids), mode, reason
            cfg = replace(self.config.blend, recompute_ratio=0.0, check_layers=(), sink_tokens=0)
        elif mode == "naive":  # cached tokens never run: only the fresh ones are computed
            cfg = replace(self.config.blend, recompute_ratio=0.0, check_layers=(), sink_tokens=0)
        else:
            cfg = self.config.blend if ratio is None else replace(self.config.blend, recompute_ratio=ratio)
        try:
            return blend(self.adapter, inputs, cfg), mode, reason
        except (ValueError, RuntimeError) as exc:  # bad cached KV must never crash a request
            log.warning("blend failed (%s); dense fallback", exc)
            return self._dense(plan.token_ids), "dense", f"blend failed: {exc}"

    def _dense(self, ids: torch.Tensor) -> FusedKV:
        """Dense prefill (the caller holds the model lock) in pieces of ``model_lock.chunk_tokens`` tokens,
        offering the model to a waiting request of another tenant between two pieces."""
        return dense_prefill(self.adapter, self.model, ids, self.model_lock.chunk_tokens, self.model_lock.yield_turn)

    def writeback(self, result: PrefillResult) -> list[ChunkKey]:
        """Store what ``result`` computed (see :func:`blending.writeback.write_back`)."""
        if not self.config.writeback or self.adapter is None:
            return []
        return write_back(self.store, self.adapter, self.fingerprint, self.model_lock, result.plan, result.fused,
                          result.exact_len)

    def warm(self, texts: Sequence[str], namespace: str, prefix_text: str | None = None) -> list[ChunkKey]:
        """Precompute and store the KV of chunks (after ``prefix_text`` when shared-prefix mode is on)."""
        if self.adapter is None:
            raise UnsupportedModelError(self.unsupported_reason or "model not supported")
        prefix_ids = self.tokenize(prefix_text) if prefix_text and self.config.shared_prefix else None
        return warm_chunks(self.store, self.adapter, self.fingerprint, self.model_lock, self.spaces(namespace),
                           [self.tokenize(t) for t in texts], prefix_ids)

    def generate(self, result: PrefillResult, params: SamplingParams) -> Iterator[tuple[int, torch.Tensor]]:
        """Decode from the fused KV; the model lock is held per step so requests interleave."""
        steps = generate_tokens(self.model, result.fused, params)
        while True:
            with self.model_lock:
                step = next(steps, None)
            if step is None:
                return
            yield step

    def score(self, result: PrefillResult, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher-forced float32 logits ``[len(continuation), vocab]`` under the result's KV, in pieces of
        ``model_lock.chunk_tokens`` tokens that let waiting requests of other tenants run in between."""
        with self.model_lock:
            return teacher_forced_logits(
                self.model, result.fused, continuation, self.model_lock.chunk_tokens, self.model_lock.yield_turn
            )
