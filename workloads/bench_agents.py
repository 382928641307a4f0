"""``kvfuse bench agents``: dense vs anchor correction vs hybrid (vs CacheBlend) on multi-agent pipelines.

Every agent call is run densely (the reference, whose replies feed the next agents so every method sees
the same prompts) and with each reuse method, each with its own store and anchor pool. ``base`` is the
ablation of anchor mode without the learned deviation (the first context's KV reused as is, re-rotated);
``blend``/``naive`` reuse chunks keyed after each agent's own prefix. Reports reuse rate (calls served without a dense
fallback, after warm-up tasks), TTFT ratio to dense (anchor matching and correction included), final
answer accuracy and fidelity (teacher-forced top-1 agreement, KL) per number of agents.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from blending.anchors import AnchorConfig
from blending.calibration import Calibration
from blending.decode import SamplingParams
from blending.engine import Engine, EngineConfig, PrefillRequest
from blending.fidelity import DEFAULT_RATIOS, dense_answer, fidelity, keeps_answer, measure_curve
from blending.guard import GuardConfig
from blending.model import ModelSpec, load_model
from blending.planner import PromptSegment
from kvstore import StoreConfig, TieredStore
from workloads.agents import agent_prompt_segments, check_answer, make_agent_tasks, make_pipeline
from workloads.cli import Steps, bench_table, run_bench

_KIND = {"prefix": "prefix", "shared": "chunk", "own": "text"}
# base: anchor mode without the deviation; learned: auto whose guard blends a sample of its exact-only
# calls aside (shadow comparisons, drained between calls), so the tenant can earn a budget during warm-up
METHODS = ("auto", "learned", "anchor", "hybrid", "base", "blend", "naive")
LEARN_EVIDENCE = 4  # shadow comparisons the learned method needs (the service's default is 20)


def run(num_agents: int, topology: str, tasks: int, warmup: int, prefix_tokens: int, fact_tokens: int,
        answer_tokens: int, seed: int, sheets: int | None = None, calibration: Calibration | None = None,
        steps: Steps | None = None, *, accuracy_tokens: int = 24) -> dict[str, Any]:
    """One pipeline of ``num_agents`` agents over ``tasks`` tasks; ``steps.done()`` after each agent call.

    Replies passed on to later agents have ``answer_tokens`` (and fidelity is measured over them); the final
    agent's answer checked for accuracy may run to ``accuracy_tokens``, for every method alike (the model
    restates the question before the fact, so a short answer cut off before it scores nothing)."""
    steps = steps or Steps()
    loaded = load_model(ModelSpec())
    # One engine (store and anchor pool) per method, so no method learns from another's requests; the
    # guard stays off so nothing runs in the background between timed calls.
    learn = GuardConfig(sample_rate=1.0, min_evidence=LEARN_EVIDENCE)
    engines = {m: Engine(loaded, TieredStore.from_config(StoreConfig(cpu_bytes=2 << 30)),
                         EngineConfig(anchors=AnchorConfig(apply_deviation=m != "base"),
                                      guard=learn if m == "learned" else GuardConfig(sample_rate=0.0)))
               for m in ("dense", *METHODS)}
    engine = engines["dense"]
    if calibration is not None:
        engines["auto"].set_calibration(calibration)
        engines["learned"].set_calibration(calibration)
    pipeline = make_pipeline(num_agents, topology, seed=seed, prefix_tokens=prefix_tokens)  # type: ignore[arg-type]
    params = SamplingParams.greedy(loaded.tokenizer, accuracy_tokens)
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in ("dense", *METHODS)}
    prompt_tokens: list[int] = []
    for t, task in enumerate(make_agent_tasks(tasks, seed=seed, fact_tokens=fact_tokens, sheets=sheets)):
        replies: list[str] = []
        for a in range(num_agents):
            steps.now(f"{num_agents} agents: task {t + 1}/{tasks}, agent {a + 1}")
            segs = tuple(PromptSegment(s.text, _KIND[s.kind])  # type: ignore[arg-type]
                         for s in agent_prompt_segments(pipeline, a, task, replies))
            dense, answer = dense_answer(engine, PrefillRequest(segs), answer_tokens)
            reference = engine.score(dense, answer)
            text = str(loaded.tokenizer.decode(answer, skip_special_tokens=True))
            replies.append(text)
            final = a == num_agents - 1
            if final:  # the same answer length every method gets below
                text = str(loaded.tokenizer.decode([tok for tok, _ in engine.generate(dense, params)],
                                                   skip_special_tokens=True))
            prompt_tokens.append(dense.fused.stats.total_tokens)
            if t >= warmup:
                rows["dense"].append({"reused": 0.0, "cached_share": 0.0, "ttft_ratio": 1.0, "agreement": 1.0,
                                      "same": 1.0,
                                      "kl": 0.0,
                                      "ttft_ms": dense.ttft_s * 1000, "final": float(final), "agent": float(a),
                                      "correct": float(final and check_answer(task, text))})
            for method in METHODS:
                eng = engines[method]
                mode = {"base": "anchor", "learned": "auto"}.get(method, method)
                result = eng.prefill(PrefillRequest(segs, mode=mode))  # type: ignore[arg-type]
                if method in ("blend", "naive", "auto", "learned"):  # as the sidecar does: store the chunks after
                    eng.writeback(result)  # the response
                if eng.guard is not None and method == "learned":
                    eng.guard.drain()  # background checks never overlap a timed call
                if t < warmup:
                    continue
                fid = fidelity(eng, result, reference, answer)
                same = float(keeps_answer(eng, result, answer, answer_tokens))
                correct = 0.0
                if final:
                    out = [tok for tok, _ in eng.generate(result, params)]
                    correct = float(check_answer(task, str(loaded.tokenizer.decode(out, skip_special_tokens=True))))
                st = result.fused.stats
                rows[method].append({"reused": float(result.mode != "dense"),
                                     "cached_share": (st.exact_tokens + st.reused_tokens) / st.total_tokens,
                                     "ttft_ms": result.ttft_s * 1000,
                                     "ttft_ratio": result.ttft_s / dense.ttft_s, "agreement": fid.agreement,
                                     "same": same,
                                     "kl": fid.kl, "final": float(final), "agent": float(a), "correct": correct})
            steps.done()
    for eng in engines.values():
        eng.store.close()
    summary = {m: _summarize(r) for m, r in rows.items() if r}
    pools = {m: eng.anchor_pool.stats() for m, eng in engines.items()
             if m in ("anchor", "hybrid", "base") and eng.anchor_pool}
    return {"agents": num_agents, "topology": topology, "sheets": sheets,
            "mean_prompt_tokens": statistics.fmean(prompt_tokens), "methods": summary, "anchor_pools": pools}


def _summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    reused = [r for r in rows if r["reused"]] or rows
    finals = [r for r in rows if r["final"]]
    return {"reuse_rate": statistics.fmean(r["reused"] for r in rows),
            "cached_share": statistics.fmean(r["cached_share"] for r in rows),
            "ttft_ratio": statistics.fmean(r["ttft_ratio"] for r in rows),
            "ttft_ratio_reused": statistics.fmean(r["ttft_ratio"] for r in reused),
            "agreement": statistics.fmean(r["agreement"] for r in rows),
            "same_answer": statistics.fmean(r["same"] for r in rows),
            "kl": statistics.fmean(r["kl"] for r in rows),
            "accuracy": statistics.fmean(r["correct"] for r in finals) if finals else float("nan"),
            "correct": int(sum(r["correct"] for r in finals)), "finals": len(finals),
            "ttft_ratio_by_agent": [statistics.fmean(r["ttft_ratio"] for r in rows if r["agent"] == a)
                                    for a in sorted({r["agent"] for r in rows})],
            "calls": len(rows)}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    xs = [r["agents"] for r in results]
    for m in METHODS:
        ax1.plot(xs, [r["methods"][m]["ttft_ratio"] for r in results], "o-", label=m)
        ax2.plot(xs, [r["methods"][m]["agreement"] for r in results], "o-", label=m)
    ax1.set(xlabel="agents", ylabel="TTFT / dense", title="TTFT ratio")
    ax2.set(xlabel="agents", ylabel="top-1 agreement", title="fidelity vs dense", ylim=(0, 1.05))
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def calibrate(quick: bool, prompts: int, calibration_from: Path | None, steps: Steps) -> Calibration:
    """auto's curve: from an earlier ``--json`` report (bench rag or agents), else measured now."""
    cal_engine = Engine(load_model(ModelSpec()), TieredStore.from_config(StoreConfig(cpu_bytes=1 << 30)),
                        EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    try:
        if calibration_from is not None:
            saved = json.loads(calibration_from.read_text())["calibration"]
            return Calibration.from_dict(cal_engine.fingerprint, saved)
        steps.begin(1, "calibrating auto on the built-in workload")
        return measure_curve(cal_engine, (0.15, 1.0) if quick else DEFAULT_RATIOS, prompts=prompts)
    finally:
        cal_engine.store.close()


def run_all(agent_counts: Sequence[int], topology: str, tasks: int, warmup: int, prefix_tokens: int,
            fact_tokens: int, answer_tokens: int, seed: int, sheets: int | None, calibration: Calibration,
            steps: Steps | None = None, *, accuracy_tokens: int = 24) -> list[dict[str, Any]]:
    """:func:`run` for each number of agents, one progress bar over all their agent calls."""
    steps = steps or Steps()
    steps.begin(sum(agent_counts) * tasks)
    return [run(n, topology, tasks, warmup, prefix_tokens, fact_tokens, answer_tokens, seed, sheets, calibration,
                steps, accuracy_tokens=accuracy_tokens) for n in agent_counts]


def render(results: list[dict[str, Any]], topology: str, warmup: int, sheets: int | None, cal: Calibration,
           console: Console) -> None:
    """One row per number of agents and method, and a legend."""
    recurring = f", {sheets} recurring fact sheets" if sheets else ""
    table = bench_table(f"multi-agent reuse ({topology}{recurring}, after {warmup} warm-up tasks)", "agents",
                        ["method", "reuse", "from cache", "TTFT / dense", "same answer", "top-1 agree", "KL",
                         "accuracy"], labels=2)
    for r in results:
        for m, s in r["methods"].items():
            table.add_row(str(r["agents"]), m, f"{s['reuse_rate']:.2f}", f"{s['cached_share']:.2f}",
                          f"{s['ttft_ratio']:.3f}", f"{s['same_answer']:.2f}", f"{s['agreement']:.3f}",
                          f"{max(s['kl'], 0.0):.4f}", f"{s['correct']}/{s['finals']}")
    console.print(table)
    console.print(f"auto's calibration curve (answers kept): {cal.as_dict()['curve']}. reuse: share of calls "
                  "served without a dense fallback; from cache: share of prompt tokens reused; same answer: share "
                  "of calls whose greedy reply equals dense's token for token; accuracy: final answers correct / "
                  f"final answers; learned: auto whose guard blends a sample of its exact-only calls aside and "
                  f"compares answers, blending once {LEARN_EVIDENCE} were kept (20 in the service).")


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.bench_agents``: the ``kvfuse bench agents`` command."""
    return run_bench("agents", argv)


if __name__ == "__main__":
    raise SystemExit(main())
