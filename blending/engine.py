"""The embedded engine: plan a prompt, fetch chunk KV, blend or prefill, decode, write new KV back."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from blending.adapter import ModelAdapter, UnsupportedModelError
from blending.anchor_flow import anchor_prefill
from blending.anchors import AnchorConfig, AnchorPool, AnchorStore
from blending.cacheblend import BlendConfig, blend
from blending.decode import SamplingParams, generate_tokens, teacher_forced_logits
from blending.fused import BlendStats, FusedKV
from blending.model import LoadedModel
from blending.planner import MODES, KeySpaces, Mode, Plan, PromptSegment, make_plan
from blending.precompute import chunk_kv
from kvstore.chunk import KVChunk, dtype_name
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


@dataclass(frozen=True)
class PrefillRequest:
    segments: tuple[PromptSegment, ...]
    namespace: str = "default"
    mode: Mode = "auto"
    recompute_ratio: float | None = None


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

    def summary(self) -> dict[str, object]:
        s = self.fused.stats
        return {
            "mode": self.mode,
            "fallback_reason": self.fallback_reason,
            "ttft_ms": round(self.ttft_s * 1000, 3),
            "prompt_tokens": s.total_tokens,
            "cached_tokens": s.cached_tokens,
            "reused_tokens": s.reused_tokens + s.exact_tokens,
            "recomputed_tokens": s.recomputed_tokens,
            "computed_tokens": s.computed_tokens,
            "chunk_hits": self.chunk_hits,
            "chunk_misses": self.chunk_misses,
        }


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
        self.model_lock = threading.Lock()
        self.adapter: ModelAdapter | None
        self.unsupported_reason: str | None = None
        try:
            self.adapter = ModelAdapter(loaded.model)
        except UnsupportedModelError as exc:  # serve dense through HF only
            self.adapter, self.unsupported_reason = None, str(exc)
        self.layout = self._layout()
        self.anchor_pool = None
        if self.adapter is not None:
            persist = AnchorStore(store, self.fingerprint, self.layout)
            self.anchor_pool = AnchorPool(self.adapter.inv_freq, self.config.anchors, persist)

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
        keyed = [s for s in plan.segments if s.key is not None]
        found = self.store.get_many([s.key for s in keyed if s.key is not None])
        for seg, chunk in zip(keyed, found, strict=True):
            seg.cached = self._valid(seg.token_ids, chunk, plan)
        retry = [s for s in keyed if s.cached is None and s.fallback_key is not None]
        if retry:
            found = self.store.get_many([s.fallback_key for s in retry if s.fallback_key is not None])
            for seg, chunk in zip(retry, found, strict=True):
                seg.cached = self._valid(seg.token_ids, chunk, plan)

    def _valid(self, ids: torch.Tensor, chunk: KVChunk | None, plan: Plan) -> KVChunk | None:
        if chunk is None:
            return None
        expected = (self.adapter.shape.num_layers, 2) if self.adapter else None
        if chunk.fingerprint != self.fingerprint or chunk.num_tokens != len(ids) or chunk.dtype != self.model.dtype or (
            expected is not None and tuple(chunk.kv.shape[:2]) != expected
        ):
            plan.lookup_errors.append("cached KV does not match the model or the chunk; ignored")
            return None
        return chunk

    def prefill(self, request: PrefillRequest) -> PrefillResult:
        """Plan, look up and fuse the prompt's KV; falls back to a dense prefill with a reason."""
        if request.mode not in MODES:
            raise ValueError(f"unknown mode {request.mode!r}; choose one of {', '.join(MODES)}")
        start = time.perf_counter()
        anchored = request.mode in ("anchor", "hybrid")
        plan = self._anchor_plan(request.segments, request.namespace) if anchored else self.plan(
            request.segments, request.namespace)
        if plan.num_tokens == 0:
            raise ValueError("the prompt is empty")
        if plan.num_tokens > self.config.max_prompt_tokens:
            raise PromptTooLongError(
                f"prompt has {plan.num_tokens} tokens; the limit is {self.config.max_prompt_tokens}"
            )
        mode, reason = self._choose_mode(request.mode)
        if mode != "dense":
            self._lookup(plan)
        t_lookup = time.perf_counter()
        if mode in ("blend", "naive") and plan.hits == 0:
            mode, reason = "dense", "no cached KV for any segment"
        limit = self.adapter.max_reuse_positions if self.adapter is not None else None
        if mode != "dense" and limit is not None and plan.num_tokens > limit:
            mode, reason = "dense", "dynamic rope: positions beyond the trained length"
        computed: list[tuple[ChunkKey, KVChunk]] = []
        with self.model_lock:
            if mode in ("anchor", "hybrid"):
                fused, mode, reason, computed = self._anchor(plan, mode, request.recompute_ratio, request.namespace)
            else:
                fused, mode, reason = self._compute(plan, mode, reason, request.recompute_ratio)
        end = time.perf_counter()
        if computed and self.config.writeback:
            # Put-if-absent: a base other requests' anchors were learned against is never replaced.
            present = self.store.contains_many([k for k, _ in computed])
            self.store.put_many([item for item, here in zip(computed, present, strict=True) if not here])
        if reason:
            log.info("dense fallback: %s", reason)
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
        )

    def _choose_mode(self, requested: str) -> tuple[str, str | None]:
        if self.adapter is None:
            return "dense", f"model not supported for reuse: {self.unsupported_reason}"
        if requested == "auto":
            return "blend", None
        return requested, None

    def _anchor(
        self, plan: Plan, mode: str, ratio: float | None, namespace: str
    ) -> tuple[FusedKV, str, str | None, list[tuple[ChunkKey, KVChunk]]]:
        assert self.adapter is not None and self.anchor_pool is not None
        hybrid = None
        if mode == "hybrid":
            hybrid = replace(self.config.blend, recompute_ratio=self.config.hybrid_ratio if ratio is None else ratio)
        try:
            fused, reason, computed = anchor_prefill(
                self.adapter, self.anchor_pool, plan, hybrid, self._dense, self.fingerprint, namespace=namespace
            )
        except (ValueError, RuntimeError) as exc:  # bad cached KV or anchors must never crash a request
            log.warning("anchor prefill failed (%s); dense fallback", exc)
            return self._dense(plan.token_ids), "dense", f"anchor failed: {exc}", []
        return fused, "dense" if reason else mode, reason, computed

    def _compute(
        self, plan: Plan, mode: str, reason: str | None, ratio: float | None
    ) -> tuple[FusedKV, str, str | None]:
        if mode == "dense":
            return self._dense(plan.token_ids), mode, reason
        assert self.adapter is not None
        cfg = self.config.blend
        if mode == "naive":
            cfg = replace(cfg, recompute_ratio=0.0, sink_tokens=0)
        elif ratio is not None:
            cfg = replace(cfg, recompute_ratio=ratio)
        try:
            return blend(self.adapter, plan.inputs(), cfg), mode, reason
        except (ValueError, RuntimeError) as exc:  # bad cached KV must never crash a request
            log.warning("blend failed (%s); dense fallback", exc)
            return self._dense(plan.token_ids), "dense", f"blend failed: {exc}"

    def _dense(self, ids: torch.Tensor) -> FusedKV:
        if self.adapter is not None:
            t0 = time.perf_counter()
            kv, logits = self.adapter.prefill(ids)
            stats = BlendStats(total_tokens=len(ids), computed_tokens=len(ids))
            stats.times["compute"] = time.perf_counter() - t0
            return FusedKV(kv, ids, torch.arange(len(ids)), logits[-1], stats)
        with torch.inference_mode():  # unsupported architecture: HF's own forward
            out = self.model(input_ids=ids[None].to(self.model.device), use_cache=True)
        cache = out.past_key_values
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
        stats = BlendStats(total_tokens=len(ids), computed_tokens=len(ids))
        return FusedKV(kv, ids, torch.arange(len(ids)), out.logits[0, -1].float(), stats)

    def writeback(self, result: PrefillResult) -> list[ChunkKey]:
        """Store what this request computed: the exact prefix, and missing chunks (recomputed in their
        canonical context, so they match what later lookups expect). Returns the keys written."""
        if not self.config.writeback or self.adapter is None:
            return []
        plan, fused = result.plan, result.fused
        missing = [s for s in plan.misses if s.key is not None]
        present = self.store.contains_many([s.key for s in missing if s.key is not None])
        missing = [s for s, here in zip(missing, present, strict=True) if not here]
        items: list[tuple[ChunkKey, KVChunk]] = []
        prefix: KVChunk | None = None
        if plan.prefix_ids is not None and len(plan.prefix_ids):
            n = len(plan.prefix_ids)
            prefix = KVChunk(fused.kv[:, :, :, :n].contiguous().cpu(), torch.arange(n), self.fingerprint)
            head = plan.segments[0]
            if head in missing and head.key is not None:
                items.append((head.key, prefix))
        shared = prefix if plan.shared_prefix else None
        for seg in missing:
            if seg.kind != "chunk" or seg.key is None or plan.anchored:  # anchor bases are stored by prefill
                continue
            with self.model_lock:
                items.append((seg.key, chunk_kv(self.adapter, self.fingerprint, seg.token_ids, shared)))
        if items:
            self.store.put_many(items)
        return [k for k, _ in items]

    def warm(self, texts: Sequence[str], namespace: str, prefix_text: str | None = None) -> list[ChunkKey]:
        """Precompute and store the KV of chunks (after ``prefix_text`` when shared-prefix mode is on)."""
        if self.adapter is None:
            raise UnsupportedModelError(self.unsupported_reason or "model not supported")
        spaces = self.spaces(namespace)
        prefix_ids = self.tokenize(prefix_text) if prefix_text and self.config.shared_prefix else None
        prefix: KVChunk | None = None
        if prefix_ids is not None and len(prefix_ids):
            pkey = spaces.prefix_key(prefix_ids)
            prefix = self.store.get(pkey)
            if prefix is None:
                with self.model_lock:
                    prefix = chunk_kv(self.adapter, self.fingerprint, prefix_ids)
                self.store.put(pkey, prefix)
        keys: list[ChunkKey] = []
        for text in texts:
            ids = self.tokenize(text)
            key = spaces.chunk_key(ids, prefix_ids if prefix is not None else None)
            if not self.store.contains(key):
                with self.model_lock:
                    chunk = chunk_kv(self.adapter, self.fingerprint, ids, prefix)
                self.store.put(key, chunk)
            keys.append(key)
        return keys

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
        """Teacher-forced float32 logits ``[len(continuation), vocab]`` under the result's KV."""
        with self.model_lock:
            return teacher_forced_logits(self.model, result.fused, continuation)
