"""``kvfuse bench reliability``: run the reliability scenarios and print one table.

Columns: requests sent, faults injected, errors seen, wrong answers served, data lost (see
``workloads.reliability.tally``). Targets: 0 errors (no 5xx), 0 wrong KV or answers, 0 acknowledged writes
lost; the exit status is 1 when a scenario failed. The same scenarios run in ``tests/reliability``.

    kvfuse bench reliability [--quick] [--json | --markdown] [--only corruption,load] [--redis-url URL] [--threads N]
    python -m workloads.bench_reliability ...   (the same command)

Without ``--redis-url`` a private ``redis-server`` is started when one is installed (Redis scenarios are
skipped otherwise, and say so). Needs schemathesis for the fuzz suite.
"""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from workloads.cli import Steps, bench_table, run_bench
from workloads.reliability.tally import COLUMNS, HEADERS, Tally, table, total

SHORT = ("requests", "faults", "errors", "wrong", "lost")  # the table's headers for tally.HEADERS[1:]
SUITES = ("fuzz", "codec", "keys", "corruption", "redis", "ssd", "crash", "isolation", "load", "mismatch")


def run(chosen: Sequence[str] = SUITES, *, quick: bool = False, redis_url: str | None = None, threads: int = 1,
        seed: int = 0, steps: Steps | None = None) -> list[Tally]:
    """Run the ``chosen`` suites in order; one tally each (a crashed suite is a failed tally)."""
    from kvstore.redis_local import LocalRedis, redis_server_binary
    from workloads.reliability import corruption, faults, fuzz, isolation, load, mismatch, properties, ssd_crash
    from workloads.reliability.service import load_default_model, running_service

    if unknown := sorted(set(chosen) - set(SUITES)):
        raise ValueError(f"unknown suites: {unknown}")
    progress = steps or Steps()
    torch.set_num_threads(threads)
    q = quick
    model = load_default_model()
    local = None
    if redis_url is None and redis_server_binary() is not None and {"corruption", "redis", "load"} & set(chosen):
        local = LocalRedis().start()
    redis_url = redis_url or (local.url if local else None)
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="kvfuse-reliability-") as tmp:
        root = Path(tmp)

        def fuzz_suite() -> Tally:
            with running_service(model, root / "fuzz") as h:
                return fuzz.run_fuzz(h, examples=1000, seed_value=seed)

        def redis_suite() -> Tally:
            if local is None:
                return _skipped("Redis killed + restarted under load", "needs a local redis-server it may kill")
            return faults.run_redis_outage(model, root / "redis", local, seconds=9 if q else 15)

        suites: dict[str, Callable[[], Tally]] = {
            "fuzz": fuzz_suite,
            "codec": lambda: properties.codec_properties(500 if q else 2000, seed),
            "keys": lambda: properties.key_properties(300 if q else 1000, seed),
            "corruption": lambda: corruption.run_corruption(model, root / "corruption", redis_url, seed),
            "redis": redis_suite,
            "ssd": lambda: faults.run_ssd_faults(model, root / "ssd"),
            "crash": lambda: ssd_crash.run_ssd_crash(root / "crash", kills=3 if q else 8, seed_value=seed),
            "isolation": lambda: isolation.run_isolation(model, root / "isolation"),
            "load": lambda: load.run_load(model, root / "load", seconds=15 if q else 30, redis_url=redis_url),
            "mismatch": lambda: mismatch.run_mismatch(model, root / "mismatch"),
        }
        progress.begin(len(chosen))
        try:
            for name in chosen:
                progress.now(f"running {name}")
                tallies.append(_guarded(name, suites[name]))
                t = tallies[-1]
                progress.log(f"{t.suite}: {t.requests} requests, {t.faults} faults, {'pass' if t.passed else 'FAIL'}")
                progress.done()
        finally:
            if local is not None:
                local.cleanup()
    return tallies


def _guarded(name: str, step: Callable[[], Tally]) -> Tally:
    start = time.perf_counter()
    try:
        return step()
    except Exception as exc:  # a crashed scenario is a failure of the run, reported in its row
        tally = Tally(name, seconds=time.perf_counter() - start)
        tally.fail("errors", f"scenario crashed: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
        return tally


def _skipped(suite: str, reason: str) -> Tally:
    tally = Tally(f"{suite} (skipped)")
    tally.notes["skipped"] = reason
    return tally


def render(tallies: list[Tally], *, markdown: bool = False) -> None:
    """One row per suite and a total row (a rich table, or Markdown), then failures and skips."""
    from rich.console import Console

    console = Console()
    if markdown:
        print(table(tallies))
    else:
        t = bench_table("kvfuse reliability", "suite", [*SHORT, "s", "result"], wrap_labels=True)
        for tally in [*tallies, total(tallies)]:
            result = "[green]pass[/]" if tally.passed else "[red]FAIL[/]"
            t.add_row(tally.suite, *(str(getattr(tally, c)) for c in COLUMNS), f"{tally.seconds:.1f}", result)
        console.print(t)
        console.print("; ".join(f"{short}: {long}" for short, long in zip(SHORT, HEADERS[1:], strict=True)))
    for tally in tallies:
        for failure in tally.failures[:10]:
            console.print(f"- {tally.suite}: {failure}", markup=False, highlight=False)
        if "skipped" in tally.notes:
            console.print(f"- {tally.suite}: {tally.notes['skipped']}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    """``python -m workloads.bench_reliability``: the ``kvfuse bench reliability`` command."""
    return run_bench("reliability", argv)


if __name__ == "__main__":
    sys.exit(main())
