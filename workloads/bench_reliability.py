"""``kvfuse bench reliability``: run the reliability scenarios and print one table.

Columns: requests sent, faults injected, errors seen, wrong answers served, data lost (see
``workloads.reliability.tally``). Targets: 0 errors (no 5xx), 0 wrong KV or answers, 0 acknowledged writes
lost; the exit status is 1 when a scenario failed. The same scenarios run in ``tests/reliability``.

    kvfuse bench reliability [--quick] [--json] [--only corruption,load] [--redis-url URL] [--threads N]

Without ``--redis-url`` a private ``redis-server`` is started when one is installed (Redis scenarios are
skipped otherwise, and say so). Needs schemathesis for the fuzz suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from workloads.reliability.tally import Tally, table

SUITES = ("fuzz", "codec", "keys", "corruption", "redis", "ssd", "crash", "isolation", "load", "mismatch")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvfuse bench reliability", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller counts and shorter load (about 2 minutes)")
    p.add_argument("--json", action="store_true", help="print the tallies as JSON instead of the table")
    p.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(SUITES)}")
    p.add_argument("--redis-url", default=None, help="use this Redis (its data is overwritten); else a private one")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace, log: Callable[[str], None]) -> list[Tally]:
    from kvstore.redis_local import LocalRedis, redis_server_binary
    from workloads.reliability import corruption, faults, fuzz, isolation, load, mismatch, properties, ssd_crash
    from workloads.reliability.service import load_default_model, running_service

    chosen = [s for s in args.only.split(",") if s] or list(SUITES)
    unknown = set(chosen) - set(SUITES)
    if unknown:
        raise SystemExit(f"unknown suites: {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    q = args.quick
    model = load_default_model()
    local = None
    if args.redis_url is None and redis_server_binary() is not None and {"corruption", "redis", "load"} & set(chosen):
        local = LocalRedis().start()
    redis_url = args.redis_url or (local.url if local else None)
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="kvfuse-reliability-") as tmp:
        root = Path(tmp)

        def fuzz_suite() -> Tally:
            with running_service(model, root / "fuzz") as h:
                return fuzz.run_fuzz(h, examples=1000, seed_value=args.seed)

        def redis_suite() -> Tally:
            if local is None:
                return _skipped("Redis killed + restarted under load", "needs a local redis-server it may kill")
            return faults.run_redis_outage(model, root / "redis", local, seconds=9 if q else 15)

        steps: dict[str, Callable[[], Tally]] = {
            "fuzz": fuzz_suite,
            "codec": lambda: properties.codec_properties(500 if q else 2000, args.seed),
            "keys": lambda: properties.key_properties(300 if q else 1000, args.seed),
            "corruption": lambda: corruption.run_corruption(model, root / "corruption", redis_url, args.seed),
            "redis": redis_suite,
            "ssd": lambda: faults.run_ssd_faults(model, root / "ssd"),
            "crash": lambda: ssd_crash.run_ssd_crash(root / "crash", kills=3 if q else 8, seed_value=args.seed),
            "isolation": lambda: isolation.run_isolation(model, root / "isolation"),
            "load": lambda: load.run_load(model, root / "load", seconds=15 if q else 30, redis_url=redis_url),
            "mismatch": lambda: mismatch.run_mismatch(model, root / "mismatch"),
        }
        try:
            for name in chosen:
                log(f"running {name} ...")
                tallies.append(_guarded(name, steps[name]))
                t = tallies[-1]
                log(f"  {t.suite}: {t.requests} requests, {t.faults} faults, {'pass' if t.passed else 'FAIL'}")
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


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    tallies = run(args, lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps([t.as_dict() for t in tallies], indent=2, default=str))
    else:
        print(table(tallies))
        for t in tallies:
            for failure in t.failures[:10]:
                print(f"- {t.suite}: {failure}")
            if "skipped" in t.notes:
                print(f"- {t.suite}: {t.notes['skipped']}")
    return 0 if all(t.passed for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
