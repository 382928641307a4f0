"""The full ``kvfuse`` command line: the service commands of :mod:`server.cli` plus ``kvfuse bench``.

The benchmarks live here, on top of everything, so that the server never depends on them.
"""

from __future__ import annotations

import importlib

import typer

from server.cli import app

bench_app = typer.Typer(help="Benchmarks (each takes its own options; try `kvfuse bench store --help`).")
app.add_typer(bench_app, name="bench")

_PASS = {"allow_extra_args": True, "ignore_unknown_options": True}


def _bench(module: str, ctx: typer.Context) -> None:
    try:
        mod = importlib.import_module(f"workloads.{module}")
    except ImportError as exc:
        typer.secho(f"error: this benchmark is not available: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc
    raise typer.Exit(int(mod.main(list(ctx.args)) or 0))


@bench_app.command("store", context_settings=_PASS, add_help_option=False)
def bench_store(ctx: typer.Context) -> None:
    """Store tiers: put/get throughput and latency against the raw medium."""
    _bench("bench_store", ctx)


@bench_app.command("rag", context_settings=_PASS, add_help_option=False)
def bench_rag(ctx: typer.Context) -> None:
    """RAG workload: TTFT, reuse and fidelity per mode against dense prefill."""
    _bench("bench_rag", ctx)


@bench_app.command("agents", context_settings=_PASS, add_help_option=False)
def bench_agents(ctx: typer.Context) -> None:
    """Multi-agent workload: shared messages under per-agent prefixes."""
    _bench("bench_agents", ctx)


@bench_app.command("server", context_settings=_PASS, add_help_option=False)
def bench_server(ctx: typer.Context) -> None:
    """The HTTP service: blob GET/PUT throughput and chat TTFT p50/p99 at 1/8/32 clients, dense vs reuse."""
    _bench("bench_server", ctx)


@bench_app.command("reliability", context_settings=_PASS, add_help_option=False)
def bench_reliability(ctx: typer.Context) -> None:
    """Reliability suites (fuzzing, corruption, tier faults, isolation, load, model mismatch): one table of
    requests, faults, errors, wrong answers and data lost (--quick, --json, --only)."""
    _bench("bench_reliability", ctx)


def main() -> None:
    """Console-script entry point (``kvfuse``)."""
    app(prog_name="kvfuse")


if __name__ == "__main__":
    main()
