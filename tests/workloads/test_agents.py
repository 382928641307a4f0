"""Unit tests of the multi-agent workload (no model)."""

from __future__ import annotations

import re

import pytest

from workloads.agents import (
    AgentTask,
    Segment,
    agent_prompt,
    agent_prompt_segments,
    check_answer,
    make_agent_tasks,
    make_pipeline,
    run_pipeline,
)


def test_tasks_deterministic_and_answers_from_facts() -> None:
    tasks = make_agent_tasks(40, seed=0)
    assert tasks == make_agent_tasks(40, seed=0) and tasks != make_agent_tasks(40, seed=1)
    assert {t.kind for t in tasks} == {"lookup", "manager", "sum", "difference"}
    for t in tasks:
        assert check_answer(t, t.answer) and all(check_answer(t, a) for a in t.aliases)
        if t.kind in ("lookup", "manager"):
            assert check_answer(t, t.facts)
        assert t.facts.endswith("\n") and t.question.endswith("?")


def test_arithmetic_answers() -> None:
    for t in make_agent_tasks(30, seed=3, kinds=["sum", "difference"]):
        value = {m[1]: int(m[2]) for m in re.finditer(r"^- (\w+ [A-H]) (?:holds|has|sold|scored) (\d+) ", t.facts,
                                                       re.M)}
        assert len(value) >= 4 and len(set(value.values())) == len(value)  # distinct values
        a, b = re.findall(r"(?:Warehouse|Farm|Shop|Team) [A-H]", t.question)
        assert int(t.answer) == (value[a] + value[b] if t.kind == "sum" else value[a] - value[b])


def test_fact_sheet_length() -> None:
    for tokens in (150, 400, 800):
        words = sum(len(t.facts.split()) for t in make_agent_tasks(10, seed=0, fact_tokens=tokens)) / 10
        assert 0.6 * tokens < words < 0.95 * tokens


def test_check_answer_rejects() -> None:
    t = AgentTask("- Warehouse A holds 12 boxes.\n", "How many boxes does Warehouse A hold?", "12")
    assert check_answer(t, "Warehouse A holds 12 boxes.") and not check_answer(t, "It holds 112 boxes.")
    assert not check_answer(t, "13")


def test_pipeline() -> None:
    p = make_pipeline(4, "full", seed=0, prefix_tokens=(300, 60))
    assert len(p.agents) == 4 and p.agents[-1].name == "Answerer" and p == make_pipeline(4, "full", seed=0,
                                                                                       prefix_tokens=(300, 60))
    lengths = [len(a.system_prompt.split()) for a in p.agents]
    assert lengths[0] > 180 and lengths[1] < 70 and lengths[0] > 3 * lengths[1]
    assert len({a.name for a in p.agents}) == 4
    with pytest.raises(ValueError):
        make_pipeline(6, "chain")


@pytest.mark.parametrize("topology", ["chain", "full"])
def test_segments(topology: str) -> None:
    p = make_pipeline(3, topology, seed=1)  # type: ignore[arg-type]
    task = make_agent_tasks(1, seed=1)[0]
    replies = ["The facts say Warehouse A holds 3 boxes.\n", "So the answer is 3."]
    per_agent = [agent_prompt_segments(p, i, task, replies[:i]) for i in range(3)]
    for i, segs in enumerate(per_agent):
        assert "".join(s.text for s in segs) == agent_prompt(p, i, task, replies[:i])
        assert segs[0].kind == "prefix" and p.agents[i].system_prompt in segs[0].text
        assert all(s.text.endswith("\n") and not s.text[0].isspace() for s in segs)
        assert all(s.segment_id for s in segs if s.kind != "own")
    shared = [{s.segment_id: s.text for s in segs if s.kind == "shared"} for segs in per_agent]
    assert len(shared[0]) == 2 and set(shared[0]) <= set(shared[1]) and set(shared[0]) <= set(shared[2])
    reply0 = next(k for k, v in shared[1].items() if "Warehouse A holds 3" in v)
    assert (reply0 in shared[2]) == (topology == "full")
    assert len({segs[0].segment_id for segs in per_agent}) == 3
    with pytest.raises(ValueError):
        agent_prompt_segments(p, 2, task, replies[:1])


def test_run_pipeline() -> None:
    p = make_pipeline(3, "chain", seed=0)
    task = make_agent_tasks(1, seed=0)[0]
    seen: list[list[Segment]] = []

    def generate(segs: list[Segment]) -> str:
        seen.append(segs)
        return f"reply {len(seen)}"

    replies = run_pipeline(p, task, generate)
    assert replies == ["reply 1", "reply 2", "reply 3"] and len(seen) == 3
    assert any("reply 2" in s.text for s in seen[2]) and not any("reply 1" in s.text for s in seen[2])
