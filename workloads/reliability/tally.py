"""What a reliability scenario counts, and the report table over all scenarios."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

COLUMNS = ("requests", "faults", "errors", "wrong", "lost")
HEADERS = ("suite", "requests sent", "faults injected", "errors seen", "wrong answers served", "data lost")


@dataclass
class Tally:
    """Counters of one scenario.

    ``requests``: operations sent (HTTP requests, store calls, decode attempts); ``faults``: faults injected
    (corrupted blobs, killed processes, mutated inputs, refused writes provoked); ``errors``: operations that
    failed where they must not (5xx, non-JSON errors, exceptions, unexpected statuses); ``wrong``: answers or
    KV served that differ from the reference (dense answer, original bytes); ``lost``: acknowledged writes
    that could not be read back. ``failures`` describes every error / wrong / lost event (and any violated
    bound); a scenario passed when it is empty.
    """

    suite: str
    requests: int = 0
    faults: int = 0
    errors: int = 0
    wrong: int = 0
    lost: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def fail(self, kind: str, message: str) -> None:
        """Record an event of ``kind`` ("errors", "wrong", "lost" or "bound") with a description."""
        if kind in ("errors", "wrong", "lost"):
            setattr(self, kind, getattr(self, kind) + 1)
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {message}")

    def check(self, ok: bool, kind: str, message: str) -> bool:
        if not ok:
            self.fail(kind, message)
        return ok

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def total(tallies: Iterable[Tally]) -> Tally:
    out = Tally("total")
    for t in tallies:
        for c in COLUMNS:
            setattr(out, c, getattr(out, c) + getattr(t, c))
        out.seconds += t.seconds
        out.failures += [f"{t.suite}: {f}" for f in t.failures]
    return out


def table(tallies: list[Tally]) -> str:
    """A Markdown table: one row per suite and a total row."""
    rows = [*tallies, total(tallies)]
    lines = [
        "| " + " | ".join((*HEADERS, "time (s)", "result")) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1 + 1) + [":---:"]) + "|",
    ]
    for t in rows:
        cells = [f"**{t.suite}**" if t.suite == "total" else t.suite]
        cells += [str(getattr(t, c)) for c in COLUMNS]
        cells += [f"{t.seconds:.1f}", "pass" if t.passed else "FAIL"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class ScenarioError(RuntimeError):
    """A scenario cannot go on (an unexpected response); already counted in its tally."""


def ok_json(tally: Tally, response: Any, what: str = "") -> dict[str, Any]:
    """The JSON body of a 200 response; anything else is counted as an error and stops the scenario."""
    if response.status_code != 200:
        tally.fail("errors", f"{what or response.request.url.path}: {response.status_code} {response.text[:200]}")
        raise ScenarioError(f"unexpected status {response.status_code}")
    body: dict[str, Any] = response.json()
    return body
