"""Anchors are per tenant: one tenant's traffic never changes another's anchor-mode results (issue #11, item 1).

Tenant B first sends [X]; tenant A then sends its own documents in two orders, which, with tenant-free anchor
contexts, learned anchors for the very (origin, context) pair that B's [Y, X] later looks up. B's modes, fused
KV, logits and chosen tokens must be identical on an engine where A never ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from blending.decode import SamplingParams
from blending.engine import Engine, PrefillRequest, PrefillResult
from blending.model import LoadedModel
from blending.planner import PromptSegment
from kvstore import StoreConfig, TieredStore

QUESTION = "Question: Which facts do the notes above state?<|im_end|>\n<|im_start|>assistant\n"
B_DOCS = {
    "X": "The lighthouse on the northern cape was built in 1871 and is painted red and white.\n\n",
    "Y": "The ferry to the island leaves every morning at seven from the old harbour pier.\n\n",
}
A_DOCS = {
    "P": "Our quarterly revenue grew by twelve percent, driven by the new subscription plan.\n\n",
    "Q": "The merger talks with the logistics company are confidential until the board meets.\n\n",
}


def _request(docs: dict[str, str], order: str, mode: str, namespace: str) -> PrefillRequest:
    segs = (*(PromptSegment(docs[d], "chunk") for d in order), PromptSegment(QUESTION))
    return PrefillRequest(segs, namespace=namespace, mode=mode)  # type: ignore[arg-type]


@pytest.fixture()
def make_engine(smollm2: LoadedModel, tmp_path: Path) -> Iterator[Callable[[], Engine]]:
    stores: list[TieredStore] = []

    def make() -> Engine:
        store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20, ssd_dir=str(tmp_path / f"ssd{len(stores)}")))
        stores.append(store)
        return Engine(smollm2, store)

    yield make
    for store in stores:
        store.close()


def _tenant_a(engine: Engine, mode: str) -> None:
    for _ in range(3):
        for order in ("PQ", "QP"):
            engine.prefill(_request(A_DOCS, order, mode, "tenant-a"))


def _run_b(engine: Engine, mode: str, with_a: bool) -> list[tuple[PrefillResult, list[int]]]:
    """B's requests, with A's traffic between them on ``with_a``: B's results and greedy tokens."""
    out = []
    params = SamplingParams(max_tokens=4)
    for i, order in enumerate(("X", "YX", "YX", "XY", "XY")):
        if with_a and i < 3:
            _tenant_a(engine, mode)
        result = engine.prefill(_request(B_DOCS, order, mode, "tenant-b"))
        out.append((result, [t for t, _ in engine.generate(result, params)]))
    return out


@pytest.mark.parametrize("mode", ["anchor", "hybrid"])
def test_other_tenant_traffic_changes_nothing(make_engine: Callable[[], Engine], mode: str) -> None:
    alone = _run_b(make_engine(), mode, with_a=False)
    shared_engine = make_engine()
    shared = _run_b(shared_engine, mode, with_a=True)
    pool = shared_engine.anchor_pool
    assert pool is not None and int(pool.stats()["added"]) > 0  # type: ignore[call-overload]  # A learned anchors
    assert alone[1][0].mode == "dense"  # B's [Y, X] has no anchor of its own yet
    assert alone[2][0].mode == mode  # ... and uses the one it learned the second time
    for (ref, ref_tokens), (got, got_tokens) in zip(alone, shared, strict=True):
        assert (got.mode, got.fallback_reason) == (ref.mode, ref.fallback_reason)
        assert got.summary()["reused_tokens"] == ref.summary()["reused_tokens"]
        assert torch.equal(got.fused.kv, ref.fused.kv)
        assert torch.equal(got.fused.last_logits, ref.fused.last_logits)
        assert got_tokens == ref_tokens


def test_other_tenant_traffic_changes_nothing_in_auto(smollm2: LoadedModel, tmp_path: Path) -> None:
    """auto with every threshold at zero (so it reuses whatever it may): B's decisions, KV and tokens are
    the same on an engine where A never ran, though A's traffic fills the same hot cache, store and pool."""
    from blending.calibration import Calibration
    from blending.engine import EngineConfig
    from blending.policy import PolicyConfig

    eager = PolicyConfig(min_prompt_tokens=0, min_reuse_tokens=0, min_reuse_share=0.0, min_saving=0.0)

    def make(i: int) -> Engine:
        store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20, ssd_dir=str(tmp_path / f"auto{i}")))
        engine = Engine(smollm2, store, EngineConfig(policy=eager))
        engine.set_calibration(Calibration(engine.fingerprint, {0.15: 0.99}, samples=1))
        return engine

    alone, shared = _run_b(make(0), "auto", with_a=False), _run_b(make(1), "auto", with_a=True)
    assert {r.mode for r, _ in alone} - {"dense"}  # auto reused something for B
    for (ref, ref_tokens), (got, got_tokens) in zip(alone, shared, strict=True):
        assert (got.mode, got.fallback_reason) == (ref.mode, ref.fallback_reason)
        assert torch.equal(got.fused.kv, ref.fused.kv) and got_tokens == ref_tokens
