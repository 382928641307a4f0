"""Every fenced code block of README.md and docs/*.md works as written (issue #14).

- ``python``: run in its own process against the test sidecar (API keys configured; the snippet finds the
  sidecar and its key through ``KVFUSE_URL`` / ``KVFUSE_API_KEY``): exit code 0 and no error response (>= 400)
  from the sidecar while it ran (a warming failure is logged, not raised, so exit codes alone miss a 401).
- ``bash``: a block whose commands are all safe and quick (curl, ``kvfuse stats|warm --url``, ``--help``) runs
  as written, with the same checks; any other block is parsed and each command checked without running it
  (tests/docs/commands.py: scripts exist, options exist in the real parsers, plugin configs resolve).
- ``yaml`` / ``json``: parsed with the real parsers; YAML is loaded as the kvfuse settings or the LMCache
  configuration it is.
- anything else (a diagram) and a block that cannot run here: a visible ``<!-- snippet: skip REASON -->`` line
  right before the block; a marker without a reason fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docs.commands import check_command, check_yaml, runnable
from tests.docs.conftest import error_responses
from tests.docs.snippets import ROOT, MarkdownError, Snippet, all_snippets, commands, extract, split_assignments
from tests.server.conftest import Service

TIMEOUT_S = 300


def _collect() -> list[Snippet]:
    try:
        return all_snippets()
    except MarkdownError:
        return []  # test_markdown_is_well_formed reports it


SNIPPETS = _collect()


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _run(snippet: Snippet, argv: list[str], request: pytest.FixtureRequest) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` from the repository root with the snippet environment; require exit 0 and no new error
    response at the sidecar."""
    env: dict[str, str] = request.getfixturevalue("snippet_env")
    service: Service = request.getfixturevalue("service")
    before = error_responses(service.url)
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{snippet.id} ran over {TIMEOUT_S} s") from exc
    report = f"{snippet.id} exited {done.returncode}\nstdout:\n{_tail(done.stdout)}\nstderr:\n{_tail(done.stderr)}"
    assert done.returncode == 0, report
    errors = error_responses(service.url) - before
    assert not errors, f"{snippet.id}: the sidecar answered with errors {dict(errors)}\n{report}"
    print(f"{snippet.id}: {_tail(done.stdout, 600)}")
    return done


def run_python(snippet: Snippet, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    script = tmp_path / f"snippet_{Path(snippet.path).stem}_{snippet.line}.py"
    script.write_text(snippet.code)
    _run(snippet, [sys.executable, str(script)], request)


def run_shell(snippet: Snippet, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    argvs = [split_assignments(argv)[1] for argv in commands(snippet.code)]
    argvs = [argv for argv in argvs if argv]  # plain assignments
    assert argvs, f"{snippet.id}: no command"
    run = [runnable(argv) for argv in argvs]
    if all(run):
        done = _run(snippet, ["bash", "-e", "-o", "pipefail", "-c", snippet.code], request)
        try:
            body = json.loads(done.stdout)
        except ValueError:
            return
        assert not (isinstance(body, dict) and "error" in body), f"{snippet.id}: {done.stdout}"
        return
    assert not any(run), (
        f"{snippet.id}: mixes commands that run here with commands that are only checked; split the block"
    )
    for argv in argvs:
        print(f"{snippet.id}: {' '.join(argv[:3])} ...: {check_command(argv)}")


def run_yaml(snippet: Snippet, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    data = yaml.safe_load(snippet.code)
    source = tmp_path / "snippet.yaml"
    source.write_text(snippet.code)
    print(f"{snippet.id}: {check_yaml(data, source)}")


def run_json(snippet: Snippet, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    json.loads(snippet.code)


RUNNERS: dict[str, Callable[[Snippet, pytest.FixtureRequest, Path], None]] = {
    "python": run_python,
    "bash": run_shell,
    "sh": run_shell,
    "shell": run_shell,
    "yaml": run_yaml,
    "json": run_json,
}


@pytest.mark.parametrize("snippet", [pytest.param(s, id=s.id) for s in SNIPPETS])
def test_snippet(snippet: Snippet, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if snippet.skip is not None:
        assert snippet.skip, f"{snippet.id}: the skip marker gives no reason (<!-- snippet: skip REASON -->)"
        pytest.skip(f"{snippet.id}: {snippet.skip}")
    runner = RUNNERS.get(snippet.lang)
    assert runner is not None, (
        f"{snippet.id}: nothing runs ```{snippet.lang or '(no language)'} blocks; name the language or mark the "
        "block with <!-- snippet: skip REASON -->"
    )
    runner(snippet, request, tmp_path)


def test_markdown_is_well_formed() -> None:
    """Every file parses (fences close, skip markers stand right before a block) and has code blocks."""
    snippets = all_snippets()
    assert {s.path for s in snippets} >= {"README.md", "docs/frameworks.md", "docs/engines.md"}
    assert len(SNIPPETS) == len(snippets)


MARKDOWN = """# Title

```bash
echo one
```

<!-- snippet: skip needs a GPU -->

```python
if True:
    print("two")
```

    indented text, not a fence
  ~~~~yaml
  a: ```
  ~~~~
<!-- snippet: skip -->
```
diagram
```
"""


def test_extract_finds_blocks_lines_languages_and_markers() -> None:
    got = extract(MARKDOWN, "x.md")
    assert [(s.id, s.lang, s.skip) for s in got] == [
        ("x.md:3", "bash", None),
        ("x.md:9", "python", "needs a GPU"),
        ("x.md:15", "yaml", None),
        ("x.md:19", "", ""),
    ]
    assert got[1].code == 'if True:\n    print("two")\n' and got[2].code == "a: ```\n"


@pytest.mark.parametrize(
    "text",
    [
        "```bash\necho never closed\n",
        "<!-- snippet: skip orphan -->\nSome text.\n```bash\necho\n```\n",
        "```bash\necho\n```\n<!-- snippet: skip at the end -->\n",
    ],
)
def test_extract_refuses_broken_markdown(text: str) -> None:
    with pytest.raises(MarkdownError):
        extract(text, "x.md")


def test_a_marker_without_reason_fails(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    (snippet,) = extract("<!-- snippet: skip -->\n```python\nprint(1)\n```\n", "x.md")
    with pytest.raises(AssertionError, match="gives no reason"):
        test_snippet(snippet, request, tmp_path)
    (unknown,) = extract("```\nA -> B\n```\n", "x.md")
    with pytest.raises(AssertionError, match="no language"):
        test_snippet(unknown, request, tmp_path)


def test_shell_commands_are_split_like_a_shell() -> None:
    script = (
        "bash scripts/install.sh && kvfuse serve   # a comment\n"
        "curl -s \"$URL/x\" -H 'A: b' -d '{\n  \"k\": 1}'\n"
        "kvfuse bench reliability \\\n    --quick; A=1 B=2 kvfuse stats\n"
        "echo '# not a comment' | cat\n"
    )
    assert commands(script) == [
        ["bash", "scripts/install.sh"],
        ["kvfuse", "serve"],
        ["curl", "-s", "$URL/x", "-H", "A: b", "-d", '{\n  "k": 1}'],
        ["kvfuse", "bench", "reliability", "--quick"],
        ["A=1", "B=2", "kvfuse", "stats"],
        ["echo", "# not a comment"],
        ["cat"],
    ]
    assert split_assignments(["A=1", "B=2", "kvfuse", "stats"]) == (["A=1", "B=2"], ["kvfuse", "stats"])


UNKNOWN_CONNECTOR = '{"kv_connector": "Nope", "kv_connector_module_path": "connectors.vllm_connector"}'


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["kvfuse", "serve", "--no-such-flag"], "no-such-flag"),
        (["kvfuse", "bench", "reliability", "--only", "corruption,nope"], "nope"),
        (["kvfuse", "bench", "reliability", "--fast"], "--fast"),
        (["bash", "scripts/no-such-script.sh"], "does not exist"),
        (["pip", "install", "-e", ".[no-such-extra]"], "no extra"),
        (["python", "-m", "pytest", "tests/no_such_test.py"], "does not exist"),
        (["vllm", "serve", "m", "--kv-transfer-config", UNKNOWN_CONNECTOR], "Nope"),
        (["make", "all"], "no check"),
    ],
)
def test_command_checks_refuse_what_does_not_exist(argv: list[str], message: str) -> None:
    with pytest.raises(Exception, match=message):
        check_command(argv)


PLUGIN: dict[str, Any] = {
    "remote_storage_plugin.kvfuse.module_path": "connectors.lmcache_storage",
    "remote_storage_plugin.kvfuse.class_name": "KvfuseRemoteConnector",
    "kvfuse_store": {"cpu_bytes": 0},
}
LMCACHE: dict[str, Any] = {"remote_serde": "naive", "remote_storage_plugins": ["kvfuse"], "extra_config": PLUGIN}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("port: 8000\ncolour: red\n", "colour", id="settings-unknown"),
        pytest.param("limits: {max_documents: 0}\n", "max_documents", id="settings-invalid"),
        pytest.param(yaml.safe_dump({**LMCACHE, "remote_serde": "cachegen"}), "naive", id="lmcache-serde"),
        pytest.param(yaml.safe_dump({**LMCACHE, "extra_config": {**PLUGIN, "kvfuse_colour": 1}}), "colour",
                     id="lmcache-unknown-key"),
        pytest.param(yaml.safe_dump({**LMCACHE, "extra_config": {**PLUGIN, "kvfuse_store": {"x": 1}}}), "x",
                     id="lmcache-bad-store"),
        pytest.param(yaml.safe_dump({**LMCACHE, "remote_storage_plugins": ["other"]}), "other",
                     id="lmcache-plugin-name"),
    ],
)
def test_yaml_checks_refuse_bad_configurations(tmp_path: Path, text: str, message: str) -> None:
    source = tmp_path / "config.yaml"
    source.write_text(text)
    assert check_yaml(yaml.safe_load(yaml.safe_dump(LMCACHE)), source).startswith("LMCache")
    with pytest.raises(Exception, match=message):
        check_yaml(yaml.safe_load(text), source)
