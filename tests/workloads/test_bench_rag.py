"""``kvfuse bench rag --quick`` through the typer app: it runs end to end and reports every method (not
timings), with an accuracy figure that measures something; and decoding raises no FutureWarning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from blending.decode import SamplingParams, dense_prefill, generate_tokens, teacher_forced_logits
from blending.engine import Engine, EngineConfig
from blending.guard import GuardConfig
from blending.model import LoadedModel, ModelSpec, load_model
from kvstore import StoreConfig, TieredStore
from tests.blending.test_auto import long_request
from workloads.bench_rag import timed
from workloads.cli import app


@pytest.mark.slow
@pytest.mark.filterwarnings("error::FutureWarning")
def test_bench_rag_quick(tmp_path: Path) -> None:
    out = tmp_path / "rag.json"
    plot = tmp_path / "rag.png"
    result = CliRunner().invoke(app, ["bench", "rag", "--quick", "--json", str(out), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    quality = report["quality"]
    assert {"dense", "naive", "blend 0.15", "blend 1.00", "auto"} <= set(quality)
    assert quality["dense"]["agreement"] == 1.0 and quality["dense"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert quality["dense"]["reused_share"] == 0.0  # the baseline never hits a cache
    assert quality["blend 1.00"]["agreement"] == 1.0  # recompute everything = dense
    assert quality["blend 0.15"]["recomputed_tokens"] < quality["blend 1.00"]["recomputed_tokens"]
    assert quality["naive"]["recomputed_tokens"] == 0
    assert set(report["calibration"]["curve"]) == {"0.15", "1"}
    assert report["modes"]["auto"]  # the mode auto chose is reported
    assert plot.stat().st_size > 1000
    # Accuracy: the answer is long enough to reach the fact (4 tokens never did: 0/1 for every method).
    assert report["examples"] == 3 and report["accuracy_tokens"] == 24
    assert quality["dense"]["correct"] >= 1 and quality["dense"]["n"] == 3
    assert quality["dense"]["accuracy"] == pytest.approx(quality["dense"]["correct"] / 3)
    assert quality["dense"]["same_answer"] == 3  # dense's own answer, computed again, is the same answer
    assert f"{quality['dense']['correct']}/3" in result.stdout and "…" not in result.stdout


@pytest.mark.filterwarnings("error::FutureWarning")
def test_decoding_hands_the_cache_to_the_model_without_warnings() -> None:
    """Dense prefill in pieces, decoding and teacher forcing over the model's own ``DynamicCache`` give the
    logits of one plain forward over the whole sequence."""
    loaded = load_model(ModelSpec())
    model = loaded.model
    ids = torch.tensor(loaded.tokenizer("The capital of France is a city called")["input_ids"])
    fused = dense_prefill(None, model, ids, chunk_tokens=3)
    tokens = torch.tensor([t for t, _ in generate_tokens(model, fused, SamplingParams(max_tokens=4))])
    forced = teacher_forced_logits(model, fused, tokens, chunk_tokens=2)
    with torch.inference_mode():
        full = model(input_ids=torch.cat([ids, tokens[:-1]])[None]).logits[0, len(ids) - 1 :].float()
    assert forced.shape == full.shape == (4, full.shape[-1])
    assert forced.argmax(-1).tolist() == tokens.tolist() == full.argmax(-1).tolist()
    torch.testing.assert_close(forced, full, atol=2e-3, rtol=1e-3)


def test_a_timed_repeat_is_not_served_its_own_earlier_run(smollm2: LoadedModel) -> None:
    """The best of two repeats once timed auto's second run, which found the whole prompt the first had
    just computed in the hot cache: 0.04x dense for a prompt that ran exact-only."""
    store = TieredStore.from_config(StoreConfig(cpu_bytes=256 << 20))
    engine = Engine(smollm2, store, EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    _, result = timed(engine, long_request((0, 1, 2)), repeats=2)
    stats = result.fused.stats
    assert result.mode in ("prefix", "dense") and stats.exact_tokens < stats.total_tokens // 2
    store.close()
