"""Agent middleware against a live sidecar: a 3-agent LangGraph chain and LangChain agents whose shared
context (question, other agents' messages, tool outputs) is reused across agents; the OpenAI helper."""

from __future__ import annotations

from itertools import pairwise
from typing import Annotated, Any, TypedDict

import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

from connectors.agents import SharedContext, cacheable_texts, kvfuse_extra_body, share_openai_messages
from connectors.agents_langchain import KVFuseContextMiddleware, mark_shared_messages, with_shared_context
from connectors.client import KVFuseClient
from connectors.langchain import ChatKVFuse

QUESTION = "Alice has 3 apples and Bob has 5 apples. How many apples do Alice and Bob have together?"
AGENTS = [
    ("researcher", "You are a researcher. Restate the facts needed to answer the question."),
    ("solver", "You are a careful calculator. Do the arithmetic step by step."),
    ("writer", "You are a writer. Give the final answer in one short sentence."),
]


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def _pipeline(llm: ChatKVFuse, context: SharedContext | None, mode: str | None = None) -> Any:
    graph = StateGraph(State)
    for name, system in AGENTS:
        model = with_shared_context(llm, context, mode=mode) if context is not None else llm

        def node(state: State, name: str = name, system: str = system, model: Any = model) -> dict[str, Any]:
            reply = model.invoke([SystemMessage(system), *state["messages"]])
            return {"messages": [AIMessage(reply.content, name=name, response_metadata=reply.response_metadata)]}

        graph.add_node(name, node)
    graph.add_edge(START, AGENTS[0][0])
    for (a, _), (b, _) in pairwise(AGENTS):
        graph.add_edge(a, b)
    graph.add_edge(AGENTS[-1][0], END)
    return graph.compile()


@pytest.mark.slow
def test_three_agent_langgraph_chain_reuses_shared_context(kvfuse_url: str, kv: KVFuseClient) -> None:
    llm = ChatKVFuse(base_url=kvfuse_url, max_tokens=12)
    plain = _pipeline(llm, None).invoke({"messages": [HumanMessage(QUESTION)]})  # no marking: nothing shared
    kv.wait_writebacks()
    baseline = [m.response_metadata["kvfuse"] for m in plain["messages"][1:]]
    # no chunk reused; at most the chat template's first tokens, exact, from the hot prompt cache
    assert all(i["chunk_hits"] == 0 and i["cached_tokens"] == i["exact_tokens"] for i in baseline[1:]), baseline

    context = SharedContext()  # one per graph: every shared text is warmed once
    # another first word: the hot prompt cache's exact prefix (the plain run's prompts) ends before the question
    question = QUESTION.replace("Alice", "Carol").replace("3 apples", "4 apples")
    # blend requested: these prompts (< 256 tokens) are too short for auto to reuse approximately
    out = _pipeline(llm, context, mode="blend").invoke({"messages": [HumanMessage(question)]})
    infos = [m.response_metadata["kvfuse"] for m in out["messages"][1:]]
    assert [m.name for m in out["messages"][1:]] == [a for a, _ in AGENTS]
    for k, info in enumerate(infos):  # agent k shares the question and the k replies before it
        shared = 1 + sum(len(str(m.content)) >= 32 for m in out["messages"][1 : k + 1])
        assert info["mode"] == "blend" and info["chunk_hits"] >= shared, (k, info)
        assert info["cached_tokens"] > 0 and info["reused_tokens"] > 0, (k, info)
    assert context.warmer is not None and context.warmer.failures == 0
    print("LangGraph 3-agent chain (cached/prompt):", [f"{i['cached_tokens']}/{i['prompt_tokens']}" for i in infos],
          "without marking:", [f"{i['cached_tokens']}/{i['prompt_tokens']}" for i in baseline])  # fmt: skip


def test_langchain_agents_share_context_through_middleware(kvfuse_url: str) -> None:
    llm = ChatKVFuse(base_url=kvfuse_url, max_tokens=10)
    context = SharedContext()
    planner = create_agent(llm, tools=[], system_prompt="You plan trips. Suggest one city.",
                           middleware=[KVFuseContextMiddleware(context=context)])  # fmt: skip
    critic = create_agent(llm, tools=[], system_prompt="You review travel plans. Say what is missing.",
                          middleware=[KVFuseContextMiddleware(context=context, mode="blend")])  # fmt: skip
    ask = HumanMessage("I have three days in early spring and I like museums and old churches. Where should I go?")
    plan = planner.invoke({"messages": [ask]})["messages"][-1]
    assert plan.response_metadata["kvfuse"]["cached_tokens"] > 0  # the question, warmed by the middleware
    shared = AIMessage(
        str(plan.content).strip() or "Go to Rome: the Vatican Museums and many churches.", name="planner"
    )
    review = critic.invoke({"messages": [ask, shared]})["messages"][-1]
    info = review.response_metadata["kvfuse"]
    assert info["requested_mode"] == "blend" and info["mode"] == "blend"
    n_shared = 1 + (len(str(shared.content)) >= 32)
    assert info["chunk_hits"] >= n_shared and info["cached_tokens"] > 0, info
    assert review.usage_metadata is not None and review.usage_metadata["input_token_details"]["cache_read"] > 0


def test_marking_keeps_tool_calls_and_marks_tool_outputs() -> None:
    messages = [
        SystemMessage("You are agent A, answering with the tools' help."),
        HumanMessage("What is the weather in Paris and in Rome this week?"),
        AIMessage("", tool_calls=[{"name": "weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("Paris: sunny all week, 18 to 22 degrees, light wind from the west.", tool_call_id="c1"),
        AIMessage("ok", name="agent-b"),
    ]
    marked = mark_shared_messages(messages)
    assert marked[0].content == messages[0].content  # the system prompt stays the agent's prefix
    assert marked[1].content[0]["cache_control"] == {"type": "ephemeral"}  # type: ignore[index]
    assert isinstance(marked[2], AIMessage) and marked[2].tool_calls == messages[2].tool_calls  # type: ignore[union-attr]
    assert isinstance(marked[3], ToolMessage) and marked[3].tool_call_id == "c1"
    assert marked[3].content[0]["cache_control"] == {"type": "ephemeral"}  # type: ignore[index]
    assert marked[4].content == "ok" and marked[4].name == "agent-b"  # too short to be a chunk


def test_openai_client_helper(kvfuse_url: str, kv: KVFuseClient) -> None:
    question = "Carol has 7 pencils and gives 2 of them to Dave. How many pencils does Carol have now?"
    context = SharedContext(kv)
    messages = [{"role": "system", "content": "You are a maths tutor."}, {"role": "user", "content": question}]
    marked = context.openai(messages)
    assert messages[1]["content"] == question and cacheable_texts(marked) == [question]
    assert share_openai_messages(messages, roles=("assistant",)) == messages
    assert kvfuse_extra_body() == {} and kvfuse_extra_body("hybrid", 0.2) == {
        "kvfuse": {"mode": "hybrid", "recompute_ratio": 0.2}
    }
    client = openai.OpenAI(base_url=f"{kvfuse_url}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="default", messages=marked, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                         extra_body=kvfuse_extra_body("auto"))  # fmt: skip
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens > 0
    assert (out.model_extra or {})["kvfuse"]["chunk_hits"] >= 1
