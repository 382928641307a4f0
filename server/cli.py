"""The service commands of ``kvfuse``: serve, calibrate, warm, stats (the benchmarks add ``kvfuse bench``
from outside; the server never depends on them)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from server.config import Settings, SettingsError, load_settings

app = typer.Typer(
    help="kvfuse: KV-reuse cache service for RAG and multi-agent LLM applications.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file (or $KVFUSE_CONFIG)")]
UrlOpt = Annotated[str | None, typer.Option(help="URL of a running service, e.g. http://127.0.0.1:8000")]
KeyOpt = Annotated[str | None, typer.Option(envvar="KVFUSE_API_KEY", help="API key for --url")]


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        typer.secho(f"error: bad settings: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None


def _fail(exc: Exception) -> typer.Exit:
    """One red line on stderr for a start-up failure, and exit code 1."""
    typer.secho(f"error: {exc}", err=True, fg="red")
    return typer.Exit(1)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="bind address [127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="port [8000]")] = None,
    model: Annotated[str | None, typer.Option(help="smollm2-135m-instruct, a HF dir, or a GGUF dir")] = None,
    gguf_file: Annotated[str | None, typer.Option(help="GGUF file name inside --model")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | float16 | bfloat16")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda | cuda:N")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="SSD tier and secret [~/.local/share/kvfuse]")] = None,
    cpu_bytes: Annotated[str | None, typer.Option(help="CPU tier budget, e.g. 2GiB")] = None,
    ssd_bytes: Annotated[str | None, typer.Option(help="SSD tier budget (0 disables it)")] = None,
    redis_url: Annotated[str | None, typer.Option(help="add a Redis tier, e.g. redis://127.0.0.1:6379")] = None,
    redis_cluster: Annotated[bool | None, typer.Option(help="the Redis URL is a cluster")] = None,
    mode: Annotated[str | None, typer.Option(help="default reuse mode [auto]")] = None,
    recompute_ratio: Annotated[float | None, typer.Option(help="default recompute ratio")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error")] = None,
) -> None:
    """Run the service (OpenAI-compatible API + chunk API) with the embedded engine.

    With no arguments: 127.0.0.1:8000, SmolLM2-135M-Instruct on the CPU, CPU + SSD store under the data
    directory. Settings precedence: flags > KVFUSE_* environment > YAML file > defaults.
    """
    overrides = {k: v for k, v in locals().items() if k != "config"}
    import uvicorn

    from blending.model import ModelLoadError
    from server.app import create_app
    from server.runtime import StartupError, build_engine, configure_logging

    settings = _settings(config, **overrides)
    configure_logging(settings.log_level)
    try:
        engine = build_engine(settings)
    except (ModelLoadError, StartupError) as exc:
        raise _fail(exc) from None
    except ValueError as exc:  # e.g. engine settings the model cannot honour
        raise _fail(ValueError(f"bad settings for this model: {exc}")) from None
    typer.echo(f"kvfuse: serving {engine.loaded.name} on http://{settings.host}:{settings.port}", err=True)
    try:
        uvicorn.run(
            create_app(engine, settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
        )
    finally:
        engine.store.close()


@app.command()
def calibrate(
    config: ConfigOpt = None,
    prompts: Annotated[int, typer.Option(min=1, help="calibration prompts (more: a tighter curve, slower)")] = 8,
    answer_tokens: Annotated[int, typer.Option(min=1, help="length of the greedy answers compared with dense's")] = 32,
    docs: Annotated[int, typer.Option(min=2, help="documents per prompt")] = 6,
    ratios: Annotated[str, typer.Option(help="recompute budgets to measure, comma-separated")] = (
        "0,0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.6,0.8,1"),
    json_out: Annotated[bool, typer.Option("--json", help="print the curve as JSON")] = False,
) -> None:
    """Measure auto's calibration curve (per recompute budget, the share of answers equal to dense's) for the
    configured model and persist it in the store under the model fingerprint; every instance sharing the
    store then uses it."""
    from rich.console import Console
    from rich.progress import Progress

    from blending.fidelity import measure_curve
    from blending.model import ModelLoadError
    from server.runtime import StartupError, build_engine

    settings = _settings(config, auto_calibrate=False)
    try:
        budgets = tuple(float(r) for r in ratios.split(","))
    except ValueError:
        typer.secho(f"error: --ratios must be numbers separated by commas, got {ratios!r}", err=True, fg="red")
        raise typer.Exit(2) from None
    try:
        engine = build_engine(settings)
    except (ModelLoadError, StartupError) as exc:
        raise _fail(exc) from None
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task("calibrating", total=prompts)
            cal = measure_curve(engine, budgets, prompts=prompts, docs=docs, answer_tokens=answer_tokens,
                                progress=lambda done, _: progress.update(task, completed=done))
        engine.set_calibration(cal)
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from None
    finally:
        engine.store.close()
    if json_out:
        typer.echo(json.dumps(cal.as_dict()))
        return
    console = Console()
    ladder = cal.ladder(settings.fidelity_target)
    console.print(f"calibration of {engine.loaded.name} ({cal.samples} prompts), persisted:")
    for r, kept in sorted(cal.curve.items()):
        console.print(f"  budget {r:4.2f}  same answer {kept:6.1%}  top-1 agreement {cal.agreement.get(r, 0.0):.3f}")
    chosen = f"budget {ladder[0]:.2f}" if ladder else "exact reuse only (no budget keeps that share of answers)"
    console.print(f"auto at fidelity target {settings.fidelity_target}: {chosen}")


def read_documents(files: list[Path], split: bool) -> list[tuple[str, str]]:
    """(source, text) per document: each file one document, or one per blank-line-separated block."""
    docs: list[tuple[str, str]] = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        blocks = [b.strip() for b in text.split("\n\n")] if split else [text.strip()]
        docs += [(f"{path}#{i}" if split else str(path), b) for i, b in enumerate(blocks) if b]
    return docs


@app.command()
def warm(
    files: Annotated[list[Path], typer.Argument(help="text files", exists=True, dir_okay=False)],
    split: Annotated[bool, typer.Option(help="one document per blank-line-separated block")] = False,
    system: Annotated[str | None, typer.Option(help="system prompt the documents will follow")] = None,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    tenant: Annotated[str, typer.Option(help="tenant namespace (in-process only)")] = "default",
    json_out: Annotated[bool, typer.Option("--json", help="print one JSON line per document")] = False,
    config: ConfigOpt = None,
) -> None:
    """Precompute and store the KV of documents, so later requests reuse it.

    In-process (opens the configured store and model), or against a running service with --url.
    """
    from rich.progress import Progress

    docs = read_documents(files, split)
    if not docs:
        typer.secho("error: no documents in the given files", err=True, fg="red")
        raise typer.Exit(1)
    target = _remote_warm(url, api_key, system) if url else _local_warm(_settings(config), tenant, system)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with target as put, Progress(transient=json_out) as progress:
        bar = progress.add_task("warming", total=len(docs))
        for source, text in docs:
            key, tokens = put(text)
            rows.append({"source": source, "key": key, "tokens": tokens})
            progress.advance(bar)
    for row in rows if json_out else []:
        typer.echo(json.dumps(row))
    total = sum(int(r["tokens"]) for r in rows)
    typer.echo(f"warmed {len(rows)} documents ({total} tokens) in {time.perf_counter() - start:.1f} s", err=True)


Warmer = Callable[[str], tuple[str, int]]


@contextmanager
def _local_warm(settings: Settings, tenant: str, system: str | None) -> Iterator[Warmer]:
    from blending.model import ModelLoadError
    from server.render import Renderer
    from server.runtime import StartupError, build_engine
    from server.tenancy import KeyMapper, load_secret

    try:
        engine = build_engine(settings)
    except (ModelLoadError, StartupError) as exc:
        raise _fail(exc) from None
    keys = KeyMapper(load_secret(settings.key_secret, settings.data_dir))
    prefix = Renderer(engine.tokenizer).chat_prefix(system) or None

    def put(text: str) -> tuple[str, int]:
        key = engine.warm([text], tenant, prefix)[0]
        return keys.public(tenant, key), len(engine.tokenize(text))

    try:
        yield put
    finally:
        engine.store.close()


@contextmanager
def _remote_warm(url: str, api_key: str | None, system: str | None) -> Iterator[Warmer]:
    import httpx

    def put(text: str) -> tuple[str, int]:
        r = client.post("/v1/chunks", json={"texts": [text], "prefix": system})
        _raise_for(r)
        body = r.json()
        return body["keys"][0], body["tokens"][0]

    with httpx.Client(base_url=url, headers=_auth(api_key), timeout=600) as client:
        yield put


def _auth(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _raise_for(response: Any) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except Exception:
            message = response.text[:200]
        typer.secho(f"error: HTTP {response.status_code}: {message}", err=True, fg="red")
        raise typer.Exit(1)


@app.command()
def stats(
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show a running service's store tiers and reuse totals (default URL from the settings)."""
    import httpx
    from rich.console import Console

    if url is None:
        s = _settings(config)
        url = f"http://{'127.0.0.1' if s.host in ('0.0.0.0', '::') else s.host}:{s.port}"
    try:
        r = httpx.get(f"{url.rstrip('/')}/v1/stats", headers=_auth(api_key or os.environ.get("KVFUSE_API_KEY")))
    except httpx.HTTPError as exc:
        typer.secho(f"error: cannot reach {url}: {exc}", err=True, fg="red")
        raise typer.Exit(1) from exc
    _raise_for(r)
    data = r.json()
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    render_stats(data, Console())


def human_bytes(n: int | float) -> str:
    """``1610612736`` -> ``"1.5 GiB"`` (binary units; plain bytes below 1 KiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_stats(data: dict[str, Any], console: Any) -> None:
    """The stats tables, sized to the console: cells fold instead of being cut, sizes are human."""
    from rich.table import Table

    scope = f"tenant {data['tenant']}" if data.get("scope") == "tenant" else "service"
    table = Table(title=f"kvfuse store ({data['model']}, {scope})")
    tiers = data["store"]["tiers"]
    cols = [c for c in ("name", "available", "used_bytes", "budget_bytes", "hits", "misses", "evictions", "errors")
            if all(c in t for t in tiers)]  # fmt: skip  # a tenant sees availability only
    for c in cols:
        table.add_column(c.removesuffix("_bytes"), justify="left" if c == "name" else "right", overflow="fold")
    for tier in tiers:
        table.add_row(*(human_bytes(tier[c]) if c.endswith("_bytes") else str(tier[c]) for c in cols))
    console.print(table)
    reuse = Table(title="reuse totals")
    reuse.add_column("metric", overflow="fold")
    reuse.add_column("value", justify="right", overflow="fold")
    for k, v in data["reuse"].items():
        reuse.add_row(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    console.print(reuse)


def main() -> None:
    """The service commands alone (the ``kvfuse`` console script also adds the benchmarks)."""
    app(prog_name="kvfuse")


if __name__ == "__main__":
    main()
