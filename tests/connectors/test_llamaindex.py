"""LlamaIndex adapters against a live sidecar: a query engine whose last postprocessor warms the final
nodes and whose KVFuseLLM reuses their KV; complete / stream_complete / chat with CachePoint; errors."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from llama_index.core import SummaryIndex
from llama_index.core.base.llms.types import CacheControl, CachePoint, ChatMessage, MessageRole, TextBlock
from llama_index.core.postprocessor import LongContextReorder
from llama_index.core.schema import NodeWithScore, TextNode

from connectors.client import KVFuseClient, KVFuseConnectionError
from connectors.llamaindex import KVFuseLLM, KVFuseWarmingPostprocessor
from tests.connectors.conftest import top1_agreement

TEXTS = [
    "Lake Baikal in Siberia is the deepest lake in the world, 1,642 metres at its deepest point.",
    "The Sahara is the largest hot desert in the world, covering most of North Africa.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, at 5,895 metres.",
]


def _query_engine(llm: KVFuseLLM, warm: KVFuseWarmingPostprocessor) -> Any:
    index = SummaryIndex([TextNode(text=t, id_=f"n{i}") for i, t in enumerate(TEXTS)])
    return index.as_query_engine(llm=llm, node_postprocessors=[LongContextReorder(), warm], response_mode="compact")


def test_query_engine_warms_final_nodes_and_reuses(kvfuse_url: str, kv: KVFuseClient) -> None:
    llm = KVFuseLLM(base_url=kvfuse_url, max_tokens=8, mode="blend")  # the prompt is too short for auto to blend
    warm = KVFuseWarmingPostprocessor(base_url=kvfuse_url, llm=llm)
    response = _query_engine(llm, warm).query("How deep is Lake Baikal?")
    assert warm.warmer.warmed == len(TEXTS) and warm.warmer.failures == 0
    assert len(response.source_nodes) == len(TEXTS) and str(response)
    info = llm.last_reuse
    assert info is not None and info.mode == "blend", info
    assert info.chunk_hits >= len(TEXTS) and info.cached_tokens > 0 and info.reused_tokens > 0
    print(f"LlamaIndex query engine: reuse {info.cached_tokens}/{info.prompt_tokens} tokens, ttft {info.ttft_ms} ms")

    # auto (the default; the documented example) on this short prompt: exact reuse only, dense's answer
    answers, infos = {}, {}
    for mode in ("auto", "dense"):
        other = KVFuseLLM(base_url=kvfuse_url, max_tokens=8, mode=mode)
        query = _query_engine(other, KVFuseWarmingPostprocessor(base_url=kvfuse_url, llm=other))
        answers[mode], infos[mode] = str(query.query("How deep is Lake Baikal?")), other.last_reuse
    auto = infos["auto"]
    assert auto is not None and auto.mode in ("prefix", "dense") and auto.reused_tokens == auto.recomputed_tokens == 0
    assert "exact only" in (auto.fallback_reason or ""), auto
    print(f"LlamaIndex query engine: auto {answers['auto']!r} ({auto.mode}), dense {answers['dense']!r}")
    assert answers["auto"] == answers["dense"]


def test_complete_reuses_registered_chunks_and_matches_dense(kvfuse_url: str, kv: KVFuseClient) -> None:
    llm = KVFuseLLM(base_url=kvfuse_url, max_tokens=8)
    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in TEXTS[:2]]
    KVFuseWarmingPostprocessor(base_url=kvfuse_url, llm=llm).postprocess_nodes(nodes, query_str="sahara")
    prompt = f"Facts:\n{TEXTS[1]}\n\n{TEXTS[0]}\nWhich desert covers North Africa?"
    reuse = llm.complete(prompt)
    assert reuse.additional_kwargs["kvfuse"]["chunk_hits"] == 2 and reuse.additional_kwargs["cached_tokens"] > 0
    dense = llm.complete(prompt, mode="dense")
    assert dense.additional_kwargs["kvfuse"]["mode"] == "dense" and dense.additional_kwargs["cached_tokens"] == 0
    assert dense.raw["usage"]["prompt_tokens"] == reuse.raw["usage"]["prompt_tokens"]  # the same prompt
    messages = [{"role": "user", "content": llm._text(prompt)}]
    agreement = top1_agreement(
        kv.logprobs(messages, dense.text, top_logprobs=1),
        kv.logprobs(messages, dense.text, top_logprobs=1, mode="dense"),
    )
    print(f"LlamaIndex complete: greedy equal {reuse.text == dense.text}, top-1 agreement {agreement:.2f}")
    assert agreement >= 0.75

    streamed = list(llm.stream_complete(prompt, mode="dense"))
    assert streamed[-1].text == dense.text == "".join(r.delta or "" for r in streamed)
    assert streamed[-1].additional_kwargs["kvfuse"]["mode"] == "dense"


def test_chat_cache_point_blocks_are_chunks(kvfuse_url: str, kv: KVFuseClient) -> None:
    llm = KVFuseLLM(base_url=kvfuse_url, max_tokens=6)
    cache = CachePoint(cache_control=CacheControl(type="ephemeral"))
    fact = "The Danube flows through ten countries, more than any other river, into the Black Sea."  # new text
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Answer in a few words."),
        ChatMessage(role=MessageRole.USER, blocks=[TextBlock(text=fact), cache, TextBlock(text="Where does it end?")]),
    ]
    first = llm.chat(messages)
    info = first.additional_kwargs["kvfuse"]  # new text: no chunk KV (at most the chat template's start, exact)
    assert info["chunk_hits"] == 0 and info["cached_tokens"] == info["exact_tokens"] and first.message.content
    kv.wait_writebacks()
    second = llm.chat(messages)
    assert second.additional_kwargs["kvfuse"]["chunk_hits"] >= 1 and second.additional_kwargs["cached_tokens"] > 0
    streamed = list(llm.stream_chat(messages, mode="dense"))
    assert streamed[-1].message.content == "".join(r.delta or "" for r in streamed)
    assert llm.metadata.is_chat_model and llm.metadata.num_output == 6


def test_unreachable_sidecar(dead_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(KVFuseConnectionError, match="unreachable"):
        KVFuseLLM(base_url=dead_url).complete("hello")
    nodes = [NodeWithScore(node=TextNode(text=t), score=1.0) for t in TEXTS]
    warm = KVFuseWarmingPostprocessor(base_url=dead_url, timeout=2)
    with caplog.at_level(logging.WARNING, logger="kvfuse.connectors"):
        assert warm.postprocess_nodes(nodes, query_str="desert") == nodes
    assert warm.warmer.failures == 1 and any("warming" in r.message for r in caplog.records)
