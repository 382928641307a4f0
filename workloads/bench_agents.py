"""``kvfuse bench agents``: dense vs anchor correction vs hybrid (vs CacheBlend) on multi-agent pipelines.

Every agent call is run densely (the reference, whose replies feed the next agents so every method sees
the same prompts) and with each reuse method, each with its own store and anchor pool. ``base`` is the
ablation of anchor mode without the learned deviation (the first context's KV reused as is, re-rotated);
``blend``/``naive`` reuse chunks keyed after each agent's own prefix. Reports reuse rate (calls served without a dense
fallback, after warm-up tasks), TTFT ratio to dense (anchor matching and correction included), final
answer accuracy and fidelity (teacher-forced top-1 agreement, KL) per number of agents.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from blending.anchors import AnchorConfig
from blending.calibration import Calibration
from blending.decode import SamplingParams
from blending.engine import Engine, EngineConfig, PrefillRequest
from blending.fidelity import DEFAULT_RATIOS, dense_answer, fidelity, measure_curve
from blending.guard import GuardConfig
from blending.model import ModelSpec, load_model
from blending.planner import PromptSegment
from kvstore import StoreConfig, TieredStore
from workloads.agents import agent_prompt_segments, check_answer, make_agent_tasks, make_pipeline

_KIND = {"prefix": "prefix", "shared": "chunk", "own": "text"}
METHODS = ("auto", "anchor", "hybrid", "base", "blend", "naive")  # base: anchor mode without the deviation


def run(num_agents: int, topology: str, tasks: int, warmup: int, prefix_tokens: int, fact_tokens: int,
        answer_tokens: int, seed: int, sheets: int | None = None, calibration: Calibration | None = None,
        ) -> dict[str, Any]:
    loaded = load_model(ModelSpec())
    # One engine (store and anchor pool) per method, so no method learns from another's requests; the
    # guard stays off so nothing runs in the background between timed calls.
    engines = {m: Engine(loaded, TieredStore.from_config(StoreConfig(cpu_bytes=2 << 30)),
                         EngineConfig(anchors=AnchorConfig(apply_deviation=m != "base"),
                                      guard=GuardConfig(sample_rate=0.0))) for m in ("dense", *METHODS)}
    engine = engines["dense"]
    if calibration is not None:
        engines["auto"].set_calibration(calibration)
    pipeline = make_pipeline(num_agents, topology, seed=seed, prefix_tokens=prefix_tokens)  # type: ignore[arg-type]
    eos = loaded.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=answer_tokens, stop_token_ids=(eos,) if eos is not None else ())
    rows: dict[str, list[dict[str, float]]] = {m: [] for m in ("dense", *METHODS)}
    prompt_tokens: list[int] = []
    for t, task in enumerate(make_agent_tasks(tasks, seed=seed, fact_tokens=fact_tokens, sheets=sheets)):
        replies: list[str] = []
        for a in range(num_agents):
            segs = tuple(PromptSegment(s.text, _KIND[s.kind])  # type: ignore[arg-type]
                         for s in agent_prompt_segments(pipeline, a, task, replies))
            dense, answer = dense_answer(engine, PrefillRequest(segs), answer_tokens)
            reference = engine.score(dense, answer)
            text = str(loaded.tokenizer.decode(answer, skip_special_tokens=True))
            replies.append(text)
            final = a == num_agents - 1
            prompt_tokens.append(dense.fused.stats.total_tokens)
            if t >= warmup:
                rows["dense"].append({"reused": 0.0, "cached_share": 0.0, "ttft_ratio": 1.0, "agreement": 1.0,
                                      "kl": 0.0,
                                      "ttft_ms": dense.ttft_s * 1000, "final": float(final), "agent": float(a),
                                      "correct": float(final and check_answer(task, text))})
            for method in METHODS:
                eng = engines[method]
                mode = "anchor" if method == "base" else method
                result = eng.prefill(PrefillRequest(segs, mode=mode))  # type: ignore[arg-type]
                if method in ("blend", "naive", "auto"):  # as the sidecar does: store the chunks after the response
                    eng.writeback(result)
                if t < warmup:
                    continue
                fid = fidelity(eng, result, reference, answer)
                correct = 0.0
                if final:
                    out = [tok for tok, _ in eng.generate(result, params)]
                    correct = float(check_answer(task, str(loaded.tokenizer.decode(out, skip_special_tokens=True))))
                st = result.fused.stats
                rows[method].append({"reused": float(result.mode != "dense"),
                                     "cached_share": (st.exact_tokens + st.reused_tokens) / st.total_tokens,
                                     "ttft_ms": result.ttft_s * 1000,
                                     "ttft_ratio": result.ttft_s / dense.ttft_s, "agreement": fid.agreement,
                                     "kl": fid.kl, "final": float(final), "agent": float(a), "correct": correct})
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
            "kl": statistics.fmean(r["kl"] for r in rows),
            "accuracy": statistics.fmean(r["correct"] for r in finals) if finals else float("nan"),
            "ttft_ratio_by_agent": [statistics.fmean(r["ttft_ratio"] for r in rows if r["agent"] == a)
                                    for a in sorted({r["agent"] for r in rows})],
            "calls": len(rows)}


def _plot(results: list[dict[str, Any]], path: Path) -> None:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfuse bench agents", description=__doc__)
    p.add_argument("--agents", default="2,3,5", help="comma-separated numbers of agents")
    p.add_argument("--topology", choices=["chain", "full"], default="chain")
    p.add_argument("--tasks", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="tasks that only warm the anchor pool")
    p.add_argument("--prefix-tokens", type=int, default=250)
    p.add_argument("--fact-tokens", type=int, default=650)
    p.add_argument("--answer-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sheets", type=int, help="recurring fact sheets: tasks ask new questions about this many")
    p.add_argument("--calibration-prompts", type=int, default=8, help="built-in calibration prompts for auto")
    p.add_argument("--calibration-from", type=Path, help="use the curve of an earlier --json report")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    a = p.parse_args(argv)
    if a.quick:
        a.agents, a.tasks, a.warmup, a.prefix_tokens, a.fact_tokens, a.answer_tokens = "2", 2, 1, 60, 80, 4
        a.calibration_prompts = 1
    cal_engine = Engine(load_model(ModelSpec()), TieredStore.from_config(StoreConfig(cpu_bytes=1 << 30)),
                        EngineConfig(guard=GuardConfig(sample_rate=0.0)))
    if a.calibration_from is not None:  # the curve of an earlier report (bench rag or agents)
        saved = json.loads(a.calibration_from.read_text())["calibration"]
        cal = Calibration(cal_engine.fingerprint, {float(r): v for r, v in saved["curve"].items()}, saved["samples"])
    else:
        with Console().status("calibrating auto on the built-in workload"):
            cal = measure_curve(cal_engine, (0.15, 1.0) if a.quick else DEFAULT_RATIOS, prompts=a.calibration_prompts)
    cal_engine.store.close()
    Console(width=160).print(f"auto's calibration curve: {cal.as_dict()['curve']}")
    results = [run(int(n), a.topology, a.tasks, a.warmup, a.prefix_tokens, a.fact_tokens, a.answer_tokens, a.seed,
                   a.sheets, cal) for n in a.agents.split(",")]
    sheets = f", {a.sheets} recurring fact sheets" if a.sheets else ""
    table = Table(title=f"multi-agent reuse ({a.topology}{sheets}, after {a.warmup} warm-up tasks)")
    cols = ("agents", "method", "reuse", "from cache", "TTFT/dense", "TTFT/dense reused", "agreement", "KL",
            "accuracy")
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        for m, s in r["methods"].items():
            table.add_row(str(r["agents"]), m, f"{s['reuse_rate']:.2f}", f"{s['cached_share']:.2f}",
                          f"{s['ttft_ratio']:.3f}",
                          f"{s['ttft_ratio_reused']:.3f}", f"{s['agreement']:.3f}", f"{s['kl']:.4f}",
                          f"{s['accuracy']:.2f}")
    Console(width=160).print(table)
    if a.json:
        a.json.write_text(json.dumps({"calibration": cal.as_dict(), "runs": results}, indent=2))
    if a.plot:
        _plot(results, a.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
