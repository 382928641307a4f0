"""Unit tests of the multi-agent workload (no model)."""

from __future__ import annotations

import re

import pytest

from workloads.agents import (
    DEFAULT_KINDS,
    TASK_KINDS,
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
    tasks = make_agent_tasks(60, seed=0, kinds=TASK_KINDS)
    assert tasks == make_agent_tasks(60, seed=0, kinds=TASK_KINDS) and tasks != make_agent_tasks(60, seed=1)
    assert {t.kind for t in tasks} == set(TASK_KINDS)
    assert {t.kind for t in make_agent_tasks(40, seed=0)} == set(DEFAULT_KINDS)
    for t in tasks:
        assert check_answer(t, t.answer) and all(check_answer(t, a) for a in t.aliases)
        if t.kind in ("age", "city", "count"):
            name = re.findall(r"[A-Z][a-z]+", t.question)[1]  # "How"/"In" first, then the person
            line = next(x for x in t.facts.splitlines() if x.startswith(f"- {name} "))
            assert check_answer(t, line)  # the first line about the person states the answer
        assert t.facts.endswith("\n") and t.question.endswith("?")
    with pytest.raises(ValueError):
        make_agent_tasks(1, kinds=["nope"])


def test_arithmetic_answers() -> None:
    for t in make_agent_tasks(30, seed=3, kinds=["sum", "difference"]):
        value = {m[1]: int(m[2]) for m in re.finditer(r"^- (\w+) has (\d+) \w+\.$", t.facts, re.M)}
        assert len(value) >= 5 and len(set(value.values())) == len(value)  # distinct values
        a, b = (w for w in re.findall(r"[A-Z]\w+", t.question)[1:] if w in value)
        assert int(t.answer) == (value[a] + value[b] if t.kind == "sum" else value[a] - value[b])


def test_fact_sheet_length() -> None:
    for tokens in (150, 400, 800):
        words = sum(len(t.facts.split()) for t in make_agent_tasks(10, seed=0, fact_tokens=tokens)) / 10
        assert 0.6 * tokens < words < 0.95 * tokens


def test_check_answer_rejects() -> None:
    t = AgentTask("- Anna has 12 books.\n", "How many books does Anna have?", "12")
    assert check_answer(t, "Anna has 12 books.") and not check_answer(t, "She has 112 books.")
    assert not check_answer(t, "13") and not check_answer(t, "")
    city = next(t for t in make_agent_tasks(200, seed=0, kinds=["city"]) if t.aliases)
    assert check_answer(city, f"In {city.aliases[0]}.") and not check_answer(city, "In Oslo and Lima.")


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
    replies = ["The facts say Anna holds 3 boxes.\n", "So the answer is 3."]
    per_agent = [agent_prompt_segments(p, i, task, replies[:i]) for i in range(3)]
    for i, segs in enumerate(per_agent):
        assert "".join(s.text for s in segs) == agent_prompt(p, i, task, replies[:i])
        assert segs[0].kind == "prefix" and p.agents[i].system_prompt in segs[0].text
        assert all(s.text.endswith("\n") and not s.text[0].isspace() for s in segs)
        assert all(s.segment_id for s in segs if s.kind != "own")
    shared = [{s.segment_id: s.text for s in segs if s.kind == "shared"} for segs in per_agent]
    assert len(shared[0]) == 2 and set(shared[0]) <= set(shared[1]) and set(shared[0]) <= set(shared[2])
    reply0 = next(k for k, v in shared[1].items() if "Anna holds 3" in v)
    assert (reply0 in shared[2]) == (topology == "full")
    assert len({segs[0].segment_id for segs in per_agent}) == 3
    with pytest.raises(ValueError):
        agent_prompt_segments(p, 2, task, replies[:1])
    after = agent_prompt_segments(p, 2, task, replies, question_position="after")
    assert [s.kind for s in after] == ["prefix", "own", *["shared"] * (len(after) - 3), "own"]
    assert after[-2].text == f"Question: {task.question}\n"
    assert {s.segment_id for s in after} == {s.segment_id for s in per_agent[2]}


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


def test_recurring_fact_sheets() -> None:
    tasks = make_agent_tasks(6, seed=2, sheets=2)
    assert tasks[0].facts == tasks[2].facts == tasks[4].facts != tasks[1].facts
    assert len({t.question for t in tasks}) > 2  # new questions about the same sheets
    for t in tasks:
        assert check_answer(t, t.answer)
    with pytest.raises(ValueError):
        make_agent_tasks(2, sheets=0)
