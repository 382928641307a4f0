"""What the docs' shell commands are checked against, for the commands the tests do not run.

- ``kvfuse ...``: parsed by the real command line (click/typer), down to the subcommand's options; the
  benchmarks' own argparse parsers parse their arguments (``--only`` names checked against the suites).
- ``bash scripts/X.sh``: the script exists and ``bash -n`` accepts it.
- ``pip install -e '.[extra]'``: every extra is declared in pyproject.toml.
- ``python -m pytest PATHS``: every path exists.
- ``python -m sglang.launch_server`` / ``vllm serve``: the JSON plugin configuration parses, names a class
  the connector module provides, its ``kvfuse_store`` builds a ``StoreConfig`` and every other ``kvfuse_*``
  key is one the connector reads.

``runnable`` says which commands are safe and quick enough to run for real against the test sidecar.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import json
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

import typer

from kvstore import StoreConfig
from tests.docs.snippets import ROOT

RUN_KVFUSE = {"stats", "warm"}  # need --url: they talk to the sidecar and return at once


def kvfuse_command() -> Any:
    """The real ``kvfuse`` command (a typer group; typer carries its own copy of click)."""
    from workloads.cli import app

    return typer.main.get_command(app)


def resolve_kvfuse(args: list[str]) -> tuple[list[str], list[str]]:
    """``kvfuse ARGS`` parsed by the real command line: (subcommand path, arguments left for a benchmark).
    A bad option or subcommand raises click's ``UsageError``."""
    command, path = kvfuse_command(), list[str]()
    parent: Any = None
    while True:
        ctx = command.make_context(" ".join(["kvfuse", *path]), list(args), parent=parent)
        if not hasattr(command, "resolve_command"):
            return path, list(ctx.args)
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return path, []
        name, sub, args = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None
        command, parent, path = sub, ctx, [*path, name]


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__()
        self.namespace = namespace


def parse_bench(bench: str, args: list[str]) -> argparse.Namespace:
    """The benchmark's own argparse parser applied to ``args`` (its ``main`` stops right after parsing).
    Unknown options or bad values raise AssertionError."""
    module = importlib.import_module(f"workloads.bench_{bench}")
    original = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, *a: Any, **k: Any) -> argparse.Namespace:
        raise _Parsed(original(self, *a, **k))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_only):
        try:
            module.main(args)
        except _Parsed as parsed:
            namespace = parsed.namespace
        except SystemExit as exc:  # argparse refused the arguments (its message is on stderr)
            raise AssertionError(f"kvfuse bench {bench} {' '.join(args)}: bad arguments (exit {exc.code})") from None
        else:
            raise AssertionError(f"kvfuse bench {bench} did not parse its arguments")
    return namespace


def runnable(argv: list[str]) -> bool:
    """Commands the tests run for real: curl (against the test sidecar), ``kvfuse --help`` anywhere, and the
    ``kvfuse`` commands that only talk to a running sidecar (``--url``)."""
    if argv[0] == "curl":
        return True
    if argv[0] != "kvfuse":
        return False
    if "--help" in argv[1:]:
        return True
    path, _ = resolve_kvfuse(argv[1:])
    return len(path) == 1 and path[0] in RUN_KVFUSE and "--url" in argv


def check_kvfuse(args: list[str]) -> str:
    path, rest = resolve_kvfuse(args)
    assert path, "kvfuse without a subcommand"
    if path[0] == "bench":
        assert len(path) == 2, f"kvfuse bench needs a benchmark: {args}"
        if rest:  # a benchmark that passes its arguments on to its own argparse parser
            parse_bench(path[1], rest)
        check_suites(path[1], args)
    return "kvfuse " + " ".join(path) + " parsed"


def check_suites(bench: str, args: list[str]) -> None:
    """``--only`` names suites of the benchmark (its module's ``SUITES``)."""
    suites = getattr(importlib.import_module(f"workloads.bench_{bench}"), "SUITES", None)
    if suites is not None and "--only" in args:
        unknown = set(option(args, "--only").split(",")) - set(suites)
        assert not unknown, f"kvfuse bench {bench} --only: unknown suites {sorted(unknown)} (known: {list(suites)})"


def check_bash(args: list[str]) -> str:
    assert args and args[0].endswith(".sh"), f"bash runs a script here: {args}"
    script = ROOT / args[0]
    assert script.is_file(), f"{args[0]} does not exist"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert syntax.returncode == 0, syntax.stderr
    return f"{args[0]} exists, bash -n ok"


def check_pip(args: list[str]) -> str:
    assert args[:2] == ["install", "-e"] and len(args) == 3, f"only `pip install -e '.[extra]'` is checked: {args}"
    spec = args[2]
    assert spec.startswith(".[") and spec.endswith("]"), f"not an editable install of this repository: {spec}"
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    wanted = {e.strip() for e in spec[2:-1].split(",")}
    assert wanted <= extras, f"pyproject.toml has no extra {sorted(wanted - extras)} (has {sorted(extras)})"
    return f"extras {sorted(wanted)} exist"


def check_pytest(args: list[str]) -> str:
    paths = [a for a in args if not a.startswith("-")]
    assert paths, "pytest without paths"
    for p in paths:
        assert (ROOT / p.split("::")[0]).exists(), f"{p} does not exist"
    return f"{len(paths)} test paths exist"


def string_literals(*modules: ModuleType) -> set[str]:
    """The string constants in the modules' code, docstrings and comments left out."""
    out: set[str] = set()
    for module in modules:
        tree = ast.parse(inspect.getsource(module))
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        out |= {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
        }
    return out


def check_plugin(module_path: str, class_name: str, extra: Mapping[str, Any]) -> str:
    """The connector module provides ``class_name`` (built lazily: without the engine installed, asking for it
    raises ImportError, an unknown name AttributeError); its ``kvfuse_store`` is a valid ``StoreConfig``; every
    ``kvfuse_*`` key is one the connector's code (or ``connectors.common``) names."""
    module = importlib.import_module(module_path)
    with contextlib.suppress(ImportError):  # the engine is not installed here; the name is one the module builds
        getattr(module, class_name)
    known = string_literals(module, importlib.import_module("connectors.common"))
    for key, value in extra.items():
        if not key.startswith("kvfuse_"):
            continue
        assert key in known, f"{module_path} does not read {key}"
        if key == "kvfuse_store":
            StoreConfig(**dict(value))
    return f"{module_path}.{class_name} ok"


def option(args: list[str], name: str) -> str:
    assert name in args, f"missing {name}"
    return args[args.index(name) + 1]


def check_sglang(args: list[str]) -> str:
    config = json.loads(option(args, "--hicache-storage-backend-extra-config"))
    assert option(args, "--hicache-storage-backend") == "dynamic"
    return check_plugin(config["module_path"], config["class_name"], config)


def check_vllm(args: list[str]) -> str:
    assert args[0] == "serve", args
    config = json.loads(option(args, "--kv-transfer-config"))
    return check_plugin(
        config["kv_connector_module_path"], config["kv_connector"], config.get("kv_connector_extra_config", {})
    )


def check_command(argv: list[str]) -> str:
    """Validate a command that is not run; returns what was checked (raises AssertionError or a parse error)."""
    name, args = argv[0], argv[1:]
    if name == "kvfuse":
        return check_kvfuse(args)
    if name == "bash":
        return check_bash(args)
    if name == "pip":
        return check_pip(args)
    if name in ("python", "python3") and args[:2] == ["-m", "pytest"]:
        return check_pytest(args[2:])
    if name in ("python", "python3") and args[:2] == ["-m", "sglang.launch_server"]:
        return check_sglang(args[2:])
    if name == "vllm":
        return check_vllm(args)
    raise AssertionError(f"no check for this command: {argv}")


def check_lmcache_config(config: Mapping[str, Any]) -> str:
    """An LMCache configuration using the kvfuse remote-storage plugin."""
    from connectors.lmcache_storage import _check_config

    _check_config(argparse.Namespace(**config))
    extra = dict(config["extra_config"])
    names = list(config["remote_storage_plugins"])
    assert names, "no remote_storage_plugins"
    for name in names:
        prefix = f"remote_storage_plugin.{name}."
        check_plugin(extra[prefix + "module_path"], extra[prefix + "class_name"], extra)
    return f"LMCache plugins {names} ok"


def check_yaml(data: Any, source: Path) -> str:
    """YAML blocks: an LMCache configuration, else kvfuse settings (``server.config.load_settings``)."""
    if isinstance(data, dict) and "remote_storage_plugins" in data:
        return check_lmcache_config(data)
    from server.config import load_settings

    load_settings(source)
    return "kvfuse settings ok"
