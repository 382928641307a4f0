"""The full ``kvfuse`` command line: the service commands of :mod:`server.cli` plus ``kvfuse bench``.

The benchmarks live here, on top of everything, so that the server never depends on them. Each ``kvfuse
bench X`` is a typer command defined below (its options, once); ``python -m workloads.bench_X`` runs the
same command (:func:`run_bench`). The bench modules share :class:`Steps` (a transient progress bar on
stderr) and :func:`bench_table` (a compact table that fits an 80-column terminal).
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.cli import app

bench_app = typer.Typer(help="Benchmarks: `kvfuse bench store --help` etc. list each one's options.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


# ---------------------------------------------------------------- shared by the bench modules


class Steps:
    """Progress of a long benchmark loop: ``begin(total)``, ``now(what)`` before a step, ``done()`` after
    it; ``log(line)`` prints above the bar. Without a bar (``Steps()``) only ``log`` prints (to stderr)."""

    def __init__(self, progress: Progress | None = None) -> None:
        self._progress = progress
        self._task: TaskID | None = None

    def begin(self, total: int, what: str = "") -> None:
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(what, total=total)

    def now(self, what: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=what)

    def done(self, count: int = 1) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, count)

    def log(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


@contextmanager
def progress_steps() -> Iterator[Steps]:
    """:class:`Steps` with a transient rich bar on stderr; no bar when stderr is not a terminal."""
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        yield Steps(bar)


def bench_table(title: str, label: str, columns: Sequence[str], *, labels: int = 1, wrap_labels: bool = False,
                header_width: int = 10) -> Table:
    """A compact table (no vertical rules) that fits an 80-column terminal: the first ``labels`` columns are
    never cut (not even wrapped, unless ``wrap_labels``: then they wrap at spaces), the headers of the
    number columns are broken at spaces into lines of at most ``header_width`` characters."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1),
                  pad_edge=False, title_justify="left")
    for i, name in enumerate((label, *columns)):
        if i < labels:
            table.add_column(name, no_wrap=not wrap_labels, overflow="fold")
        else:
            header = textwrap.fill(name, width=header_width, break_long_words=False)
            table.add_column(header, justify="right", overflow="fold")
    return table


def write_json(path: Path | None, report: Any) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2))


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_bench(name: str, argv: Sequence[str] | None = None) -> int:
    """``kvfuse bench <name> argv...`` (what ``python -m workloads.bench_<name>`` runs); its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app).commands["bench"].commands[name]  # type: ignore[attr-defined]
    try:
        command.main(args, prog_name=f"python -m workloads.bench_{name}")
    except SystemExit as exc:  # standalone mode: help, usage errors (2) and typer.Exit all end here
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return 0


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"workloads.bench_{name}")
    except ImportError as exc:
        typer.secho(f"error: this benchmark is not available: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc


# ---------------------------------------------------------------- options used by several benches


Fsync = StrEnum("Fsync", ["always", "never"])
SsdCache = StrEnum("SsdCache", ["cold", "warm"])
Peer = StrEnum("Peer", ["none", "lmcache"])
Topology = StrEnum("Topology", ["chain", "full"])

JsonOut = Annotated[Path | None, typer.Option("--json", metavar="PATH", help="also write the report as JSON here")]
PlotOut = Annotated[Path | None, typer.Option(metavar="PATH", help="also write a figure (PNG) here")]
Seed = Annotated[int, typer.Option(help="random seed of the workload")]
CalPrompts = Annotated[int, typer.Option(min=1, help="prompts of auto's built-in calibration (1 with --quick)")]
CalFrom = Annotated[Path | None, typer.Option(metavar="PATH", help="take auto's curve from an earlier --json report "
                                                                   "instead of measuring one")]
RedisUrl = Annotated[str | None, typer.Option(help="use this Redis server (its data is overwritten) "
                                                   "(default: start a private redis-server if installed)")]
AccuracyTokens = Annotated[int, typer.Option(min=1, help="tokens each method may generate for the answer "
                                                         "checked for accuracy (stops at end of turn)")]
AnswerTokens = Annotated[int, typer.Option(min=1, help="dense answer tokens the fidelity is measured over "
                                                       "(4 with --quick)")]


@bench_app.command("store")
def bench_store(
    sizes: Annotated[str, typer.Option(help="blob shapes, comma-separated, of: smollm2-135m-bf16 (5.9 MB), "
                                             "smollm2-135m-fp32, llama3-8b-bf16 (33.6 MB), tiny-fp32, small-bf16")]
    = "smollm2-135m-bf16,llama3-8b-bf16",
    tiers: Annotated[str, typer.Option(help="tiers, comma-separated, of cpu, ssd, redis")] = "cpu,ssd,redis",
    iterations: Annotated[int, typer.Option(min=1, help="timed puts and gets per tier and size (3 with --quick)")]
    = 10,
    warmup: Annotated[int, typer.Option(min=0, help="untimed puts and gets first (1 with --quick)")] = 2,
    redis_url: RedisUrl = None,
    ssd_dir: Annotated[str | None, typer.Option(help="directory on the disk to test (default: a temp dir)")] = None,
    fsync: Annotated[Fsync, typer.Option(help="SSD tier and raw file writes: fsync each blob, or never")]
    = Fsync.always,
    ssd_cache: Annotated[SsdCache, typer.Option(help="cold: each SSD read starts with the file dropped from the page "
                                                     "cache (reads hit the device); warm: as written")]
    = SsdCache.cold,
    peer: Annotated[Peer, typer.Option(help="also measure LMCache's matching backend in the same run (where LMCache "
                                            "is importable)")] = Peer.none,
    repeat: Annotated[int, typer.Option(min=1, help="rounds over every size and tier; each figure and ratio is "
                                                "the median of its rounds")] = 1,
    json_out: JsonOut = None,
    quick: Annotated[bool, typer.Option("--quick", help="smoke test: tiny-fp32 and small-bf16 blobs, 3 iterations")]
    = False,
) -> None:
    """Store tiers: put/get throughput (GB/s) and latency (ms) against the raw medium."""
    mod = _module("store")
    with progress_steps() as steps:
        report = mod.run(list(mod.QUICK_SIZES) if quick else csv(sizes), csv(tiers), 3 if quick else iterations,
                         warmup=1 if quick else warmup, redis_url=redis_url, ssd_dir=ssd_dir,
                         fsync=fsync.value, ssd_cache=ssd_cache.value, peer=peer.value, steps=steps,
                         repeat=repeat)
    mod.render(report)
    write_json(json_out, report)


@bench_app.command("rag")
def bench_rag(
    examples: Annotated[int, typer.Option(min=1, help="prompts per method (3 with --quick)")] = 10,
    docs: Annotated[int, typer.Option(min=2, help="documents per prompt (3 with --quick)")] = 6,
    doc_tokens: Annotated[int, typer.Option(min=8, help="approximate tokens per document (40 with --quick)")] = 140,
    answer_tokens: AnswerTokens = 10,
    accuracy_tokens: AccuracyTokens = 24,
    fidelity_target: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="auto's target: share of answers kept equal to dense's")] = 0.95,
    calibration_prompts: CalPrompts = 8,
    long_tokens: Annotated[int, typer.Option(min=0, help="also time blending at this context length, tokens "
                                                         "(0: off; at most 300 with --quick)")] = 0,
    seed: Seed = 0,
    json_out: JsonOut = None,
    plot: PlotOut = None,
    calibration_from: CalFrom = None,
    only: Annotated[str | None, typer.Option(help="methods to run, comma-separated, as the table names them, "
                                                  "e.g. 'naive,blend 0.30,auto' (dense always runs; default: all)")]
    = None,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per method and prompt, the fastest counts "
                                                     "(1 with --quick)")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="a small run for smoke tests: 3 prompts of 3 short "
                                                        "documents (timings are not meaningful)")] = False,
) -> None:
    """RAG workload: TTFT, reuse, fidelity and accuracy per reuse technique against dense prefill."""
    mod = _module("rag")
    with progress_steps() as steps:
        options = mod.RagOptions(examples=examples, docs=docs, doc_tokens=doc_tokens, answer_tokens=answer_tokens,
                                 accuracy_tokens=accuracy_tokens, fidelity_target=fidelity_target,
                                 calibration_prompts=calibration_prompts, long_tokens=long_tokens, seed=seed,
                                 calibration_from=calibration_from, only=csv(only) if only else None,
                                 repeats=repeats, quick=quick)
        report = mod.run(options, steps)
    mod.render(report, Console())
    write_json(json_out, report)
    if plot is not None:
        mod.plot(report["quality"], plot, fidelity_target)


@bench_app.command("agents")
def bench_agents(
    agents: Annotated[str, typer.Option(help="numbers of agents, comma-separated, one run each (2 with --quick)")]
    = "2,3,5",
    topology: Annotated[Topology, typer.Option(help="chain: each agent sees the previous reply; full: every "
                                                    "earlier reply")] = Topology.chain,
    tasks: Annotated[int, typer.Option(min=1, help="tasks per run (4 with --quick)")] = 6,
    warmup: Annotated[int, typer.Option(min=0, help="first tasks that only warm the caches and anchor pools, "
                                                    "not reported (1 with --quick)")] = 2,
    prefix_tokens: Annotated[int, typer.Option(min=1, help="tokens of each agent's own system prefix "
                                                           "(60 with --quick)")] = 250,
    fact_tokens: Annotated[int, typer.Option(min=1, help="tokens of the shared fact sheet (80 with --quick)")] = 650,
    answer_tokens: AnswerTokens = 10,
    accuracy_tokens: AccuracyTokens = 24,
    seed: Seed = 0,
    sheets: Annotated[int | None, typer.Option(min=1, help="recurring fact sheets that tasks ask new questions "
                                                           "about (default: a new sheet per task)")] = None,
    calibration_prompts: CalPrompts = 8,
    calibration_from: CalFrom = None,
    json_out: JsonOut = None,
    plot: PlotOut = None,
    quick: Annotated[bool, typer.Option("--quick", help="a tiny run for smoke tests")] = False,
) -> None:
    """Multi-agent workload: shared messages under per-agent prefixes, dense vs anchor/hybrid/blend/naive."""
    mod = _module("agents")
    if quick:
        agents, tasks, warmup, prefix_tokens, fact_tokens, answer_tokens = "2", 4, 1, 60, 80, 4
        calibration_prompts = 1
    with progress_steps() as steps:
        cal = mod.calibrate(quick, calibration_prompts, calibration_from, steps)
        results = mod.run_all([int(n) for n in csv(agents)], topology.value, tasks, warmup, prefix_tokens, fact_tokens,
                              answer_tokens, seed, sheets, cal, steps, accuracy_tokens=accuracy_tokens)
    mod.render(results, topology.value, warmup, sheets, cal, Console())
    write_json(json_out, {"calibration": cal.as_dict(), "runs": results})
    if plot is not None:
        mod.plot(results, plot)


@bench_app.command("server")
def bench_server(
    clients: Annotated[str | None, typer.Option(help="concurrency levels, comma-separated "
                                                     "(default: 1,8,32; 1,4 with --quick)")] = None,
    requests: Annotated[int | None, typer.Option(min=1, help="chat requests per level and mode "
                                                             "(default: max(8, clients); clients with --quick)")]
    = None,
    docs: Annotated[int | None, typer.Option(min=1, help="documents per chat request (default: 4; 2 with --quick)")]
    = None,
    doc_words: Annotated[int | None, typer.Option(min=1, help="words per document (default: 60; 20 with --quick)")]
    = None,
    blob_mb: Annotated[float, typer.Option(min=0.001, help="blob size, MB")] = 1.0,
    blob_iters: Annotated[int | None, typer.Option(min=1, help="blobs per op (default: 50; 8 with --quick)")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice)")] = None,
    long_tokens: Annotated[int | None, typer.Option(min=1, help="head-of-line: tokens of the other tenant's long "
                                                               "continuation (default: 3500; 400 with --quick)")]
    = None,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="the service's prefill_chunk_tokens, tokens")] = 64,
    json_out: JsonOut = None,
    quick: Annotated[bool, typer.Option("--quick", help="a small smoke run (1 and 4 clients, short documents)")]
    = False,
) -> None:
    """The HTTP service: blob GET/PUT throughput and chat TTFT p50/p99 at 1/8/32 clients, dense vs reuse."""
    mod = _module("server")
    levels = [int(c) for c in csv(clients or ("1,4" if quick else "1,8,32"))]
    if not levels or min(levels) < 1:
        raise typer.BadParameter("must list positive integers", param_hint="--clients")
    with progress_steps() as steps:
        report = mod.run(levels, requests, quick=quick, blob_bytes=int(blob_mb * 1e6),
                         blob_iters=blob_iters or (8 if quick else 50), docs=docs or (2 if quick else 4),
                         doc_words=doc_words or (20 if quick else 60), pool_size=8 if quick else 16, threads=threads,
                         long_tokens=long_tokens or (400 if quick else 3500), chunk_tokens=chunk_tokens, steps=steps)
    mod.print_report(report)
    write_json(json_out, report)


@bench_app.command("reliability")
def bench_reliability(
    quick: Annotated[bool, typer.Option("--quick", help="smaller counts and a 15 s load (about 3.5 minutes on "
                                                        "2 cores)")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print the tallies as JSON instead of the table")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the table as Markdown (for docs)")] = False,
    only: Annotated[str, typer.Option(help="suites, comma-separated, of: fuzz, codec, keys, corruption, redis, ssd, "
                                           "crash, isolation, load, mismatch (default: all)")] = "",
    redis_url: RedisUrl = None,
    threads: Annotated[int, typer.Option(min=1, help="torch CPU threads")] = 1,
    seed: Seed = 0,
) -> None:
    """Reliability suites: requests, faults, errors, wrong answers and data lost per suite; exits 1 if one failed."""
    mod = _module("reliability")
    chosen = csv(only) or list(mod.SUITES)
    if unknown := sorted(set(chosen) - set(mod.SUITES)):
        raise typer.BadParameter(f"unknown suites {unknown}", param_hint="--only")
    with progress_steps() as steps:
        tallies = mod.run(chosen, quick=quick, redis_url=redis_url, threads=threads, seed=seed, steps=steps)
    if json_out:
        print(json.dumps([t.as_dict() for t in tallies], indent=2, default=str))
    else:
        mod.render(tallies, markdown=markdown)
    if not all(t.passed for t in tallies):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point (``kvfuse``)."""
    app(prog_name="kvfuse")


if __name__ == "__main__":
    main()
