"""``kvfuse bench rag``: dense vs naive reuse vs CacheBlend ratios on multi-document QA, side by side.

Per method: TTFT (plan + store load + prefill) and its ratio to dense, answer accuracy, and fidelity vs
dense (teacher-forced top-1 agreement and KL over the dense answer). A long-context part measures TTFT
ratios at ~4K tokens. Optionally calibrates the ratio for a fidelity target on held-out examples.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from blending.cacheblend import BlendConfig
from blending.engine import Engine, EngineConfig, PrefillRequest
from blending.fidelity import calibrate_ratio, dense_answer, fidelity
from blending.model import LoadedModel, ModelSpec, load_model
from blending.planner import PromptSegment
from kvstore import StoreConfig, TieredStore
from workloads.rag import SYSTEM_PROMPT, RagCorpus, RagExample, check_answer

_SENTINEL = "\x00KVFUSE-CHUNK-{}\x00"


@dataclass(frozen=True)
class Method:
    name: str
    mode: str
    ratio: float | None = None
    shared_prefix: bool = True
    sink_tokens: int = 0


def rag_segments(loaded: LoadedModel, example: RagExample) -> tuple[PromptSegment, ...]:
    """The model's chat template around documents (chunks) and the question; headers are glue text."""
    docs = "".join(f"Document {i + 1}:\n{_SENTINEL.format(i)}" for i in range(len(example.documents)))
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{docs}Question: {example.question}"},
    ]
    text = str(loaded.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    segments: list[PromptSegment] = []
    for i, doc in enumerate(example.documents):
        head, text = text.split(_SENTINEL.format(i), 1)
        segments.append(PromptSegment(head, "prefix" if i == 0 else "text"))
        segments.append(PromptSegment(doc.rstrip() + "\n\n", "chunk"))
    segments.append(PromptSegment(text))
    return tuple(segments)


def _methods(ratios: list[float]) -> list[Method]:
    out = [Method("dense", "dense"), Method("naive", "naive")]
    out += [Method(f"blend {r:.2f}", "blend", r) for r in ratios]
    out += [Method("blend 0.15 standalone", "blend", 0.15, shared_prefix=False)]
    out += [Method("blend 0.15 standalone+sink4", "blend", 0.15, shared_prefix=False, sink_tokens=4)]
    return out


def _engine(loaded: LoadedModel, store: TieredStore, method: Method) -> Engine:
    cfg = EngineConfig(blend=BlendConfig(sink_tokens=method.sink_tokens), shared_prefix=method.shared_prefix)
    return Engine(loaded, store, cfg)


def _warm(engine: Engine, segments: tuple[PromptSegment, ...]) -> None:
    """Cache every chunk (and the prefix) of the prompt, as a warm-up pass would."""
    engine.writeback(engine.prefill(PrefillRequest(segments, mode="dense")))


def run_quality(loaded: LoadedModel, store: TieredStore, examples: list[RagExample], methods: list[Method],
                answer_tokens: int) -> dict[str, dict[str, float]]:
    rows: dict[str, list[dict[str, float]]] = {m.name: [] for m in methods}
    engines = {m.name: _engine(loaded, store, m) for m in methods}
    for example in examples:
        segments = rag_segments(loaded, example)
        for m in methods:
            if m.mode != "dense":
                _warm(engines[m.name], segments)
        base = engines["dense"]
        dense, answer = dense_answer(base, PrefillRequest(segments), answer_tokens)
        reference = base.score(dense, answer)
        dense_ttft = dense.ttft_s
        for m in methods:
            eng = engines[m.name]
            result = eng.prefill(PrefillRequest(segments, mode=m.mode, recompute_ratio=m.ratio))  # type: ignore[arg-type]
            if m.mode == "dense":
                dense_ttft = result.ttft_s  # the denominator is timed in the same pass as the methods
            text = str(loaded.tokenizer.decode([t for t, _ in eng.generate(result, _params(eng, answer_tokens))]))
            fid = fidelity(eng, result, reference, answer)
            rows[m.name].append({"ttft_s": result.ttft_s, "dense_ttft_s": dense_ttft, "agreement": fid.agreement,
                                 "kl": fid.kl, "correct": float(check_answer(example, text)),
                                 "recomputed": result.fused.stats.recomputed_tokens,
                                 "cached": result.fused.stats.cached_tokens})
    return {name: _summarize(r) for name, r in rows.items()}


def _params(engine: Engine, max_tokens: int) -> Any:
    from blending.decode import SamplingParams

    eos = engine.tokenizer.eos_token_id
    return SamplingParams(max_tokens=max_tokens, stop_token_ids=(eos,) if eos is not None else ())


def _summarize(rows: list[dict[str, float]]) -> dict[str, float]:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in rows)

    ratio = statistics.fmean(r["ttft_s"] / r["dense_ttft_s"] for r in rows)
    return {"ttft_ms": mean("ttft_s") * 1000, "ttft_ratio": ratio, "agreement": mean("agreement"),
            "kl": mean("kl"), "accuracy": mean("correct"),
            "recomputed_tokens": mean("recomputed"), "cached_tokens": mean("cached"), "n": len(rows)}


def run_long(loaded: LoadedModel, store: TieredStore, corpus: RagCorpus, target_tokens: int, ratios: list[float],
             repeats: int) -> dict[str, dict[str, float]]:
    """TTFT at a long context: ~target_tokens of documents, chunks cached, store load included."""
    rng = random.Random(7)
    n_docs = max(2, min(len(corpus), target_tokens // max(1, corpus.doc_tokens)))
    example = corpus.example(rng.sample(range(len(corpus)), n_docs), rng) if corpus.fact_doc_ids else None
    if example is None:
        raise ValueError("corpus has no fact documents")
    engine = _engine(loaded, store, Method("long", "blend"))
    segments = rag_segments(loaded, example)
    _warm(engine, segments)
    engine.prefill(PrefillRequest(segments, mode="blend"))  # warm-up: first calls pay one-time costs
    out: dict[str, dict[str, float]] = {}
    for name, mode, ratio in [("dense", "dense", None), *((f"blend {r:.2f}", "blend", r) for r in ratios)]:
        times = [engine.prefill(PrefillRequest(segments, mode=mode, recompute_ratio=ratio)).ttft_s  # type: ignore[arg-type]
                 for _ in range(repeats)]
        out[name] = {"ttft_ms": statistics.median(times) * 1000}
    tokens = int(engine.plan(segments, "default").num_tokens)
    for row in out.values():
        row["ttft_ratio"] = row["ttft_ms"] / out["dense"]["ttft_ms"]
        row["prompt_tokens"] = tokens
    return out


def _table(title: str, rows: dict[str, dict[str, float]], cols: list[str]) -> Table:
    table = Table(title=title)
    table.add_column("method")
    for c in cols:
        table.add_column(c, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[c]:.3f}" if c in row else "-" for c in cols))
    return table


def _plot(quality: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted((float(n.split()[1]), r) for n, r in quality.items() if n.startswith("blend ") and len(n.split()) == 2)
    if "naive" in quality:
        pts.insert(0, (0.0, quality["naive"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for p in pts]
    ax.plot(xs, [p[1]["agreement"] for p in pts], "o-", label="top-1 agreement vs dense")
    ax.plot(xs, [p[1]["ttft_ratio"] for p in pts], "s--", label="TTFT / dense TTFT")
    ax.set_xlabel("recompute ratio")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("kvfuse CacheBlend on SmolLM2-135M (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfuse bench rag", description=__doc__)
    p.add_argument("--examples", type=int, default=12)
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--doc-tokens", type=int, default=100)
    p.add_argument("--ratios", default="0.15,0.3,0.5,1.0")
    p.add_argument("--calibration-ratios", default="0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.7,1.0")
    p.add_argument("--answer-tokens", type=int, default=10)
    p.add_argument("--long-tokens", type=int, default=4096, help="context length of the TTFT part (0 = skip)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--fidelity-target", type=float, default=None, help="calibrate the ratio for this agreement")
    p.add_argument("--calibration-examples", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = p.parse_args(argv)
    if args.quick:
        args.examples, args.docs, args.doc_tokens, args.long_tokens, args.repeats = 1, 3, 40, 300, 1
        args.answer_tokens, args.calibration_examples, args.calibration_ratios = 4, 1, "0.15,1.0"
    ratios = [float(r) for r in args.ratios.split(",")]
    console = Console()
    loaded = load_model(ModelSpec())
    report: dict[str, Any] = {"model": loaded.name, "examples": args.examples, "docs": args.docs,
                              "doc_tokens": args.doc_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        store = TieredStore.from_config(StoreConfig(cpu_bytes=4 << 30, ssd_dir=tmp, ssd_bytes=8 << 30))
        corpus = RagCorpus.build(max(24, args.docs * 4), doc_tokens=args.doc_tokens, seed=args.seed)
        rng = random.Random(args.seed)
        examples = [corpus.sample_example(args.docs, rng) for _ in range(args.examples)]
        quality = run_quality(loaded, store, examples, _methods(ratios), args.answer_tokens)
        report["quality"] = quality
        console.print(_table("RAG quality and TTFT vs dense (store load included)", quality,
                             ["ttft_ms", "ttft_ratio", "accuracy", "agreement", "kl", "recomputed_tokens"]))
        if args.long_tokens:
            long_corpus = RagCorpus.build(max(48, args.long_tokens // args.doc_tokens + 8),
                                          doc_tokens=args.doc_tokens, seed=args.seed + 1)
            report["long_context"] = run_long(loaded, store, long_corpus, args.long_tokens, ratios, args.repeats)
            console.print(_table(f"TTFT at ~{args.long_tokens} tokens", report["long_context"],
                                 ["prompt_tokens", "ttft_ms", "ttft_ratio"]))
        if args.fidelity_target is not None:
            engine = _engine(loaded, store, Method("cal", "blend"))
            cal_examples = [corpus.sample_example(args.docs, rng) for _ in range(args.calibration_examples)]
            requests = [PrefillRequest(rag_segments(loaded, e)) for e in cal_examples]
            cal_ratios = [float(r) for r in args.calibration_ratios.split(",")]
            cal = calibrate_ratio(engine, requests, args.fidelity_target, cal_ratios, args.answer_tokens,
                                  prepare=lambda r: _warm(engine, r.segments))
            held = run_quality(loaded, store, examples, [Method("dense", "dense"),
                               Method(f"calibrated {cal.ratio:.2f}", "blend", cal.ratio)], args.answer_tokens)
            report["calibration"] = {"target": cal.target, "ratio": cal.ratio, "reached": cal.reached,
                                     "measured": cal.measured, "held_out": held}
            console.print(f"fidelity target {cal.target}: ratio {cal.ratio} (calibration {cal.measured})")
            console.print(_table("held-out examples at the calibrated ratio", held, ["ttft_ratio", "agreement", "kl"]))
        store.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        _plot(report["quality"], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
