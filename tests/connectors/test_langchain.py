"""LangChain adapters against a live sidecar: a RAG chain (retriever -> prompt -> ChatKVFuse) that reuses
chunk KV, checked against dense; the documents option; streaming and async; error behaviour."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough

from blending.engine import Engine
from blending.model import LoadedModel
from connectors.client import KVFuseAPIError, KVFuseClient, KVFuseConnectionError
from connectors.langchain import ChatKVFuse, KVFuseWarmingRetriever, documents_to_messages, to_openai_messages
from kvstore import StoreConfig, TieredStore
from tests.connectors.conftest import top1_agreement

DOCS = [
    Document(
        page_content="The Eiffel Tower is a wrought-iron lattice tower in Paris. It was completed in 1889 "
        "and is 330 metres tall.",
        id="eiffel",
    ),
    Document(
        page_content="Mount Fuji is the highest mountain in Japan, rising to 3,776 metres. It is an active "
        "volcano near Tokyo.",
        id="fuji",
    ),
    Document(
        page_content="The Amazon is the largest river in the world by discharge volume. It flows through "
        "Brazil, Peru and Colombia.",
        id="amazon",
    ),
    Document(
        page_content="Paris is the capital of France, on the Seine. The Louvre in Paris is the most visited "
        "museum in the world.",
        id="paris",
    ),
]
SYSTEM = "Answer the question in a few words, using the documents."


class KeywordRetriever(BaseRetriever):
    """The ``k`` documents sharing the most words (of 4+ letters) with the query."""

    docs: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        words = set(re.findall(r"[a-z]{4,}", query.lower()))
        scored = [(len(words & set(re.findall(r"[a-z]{4,}", d.page_content.lower()))), d) for d in self.docs]
        ranked = sorted((s for s in scored if s[0]), key=lambda s: -s[0])
        return [d for _, d in ranked[: self.k]]


def _prompt() -> ChatPromptTemplate:
    return ChatPromptTemplate.from_messages(
        [("system", SYSTEM), MessagesPlaceholder("context"), ("human", "{question}")]
    )


def test_rag_chain_reuses_chunk_kv_and_matches_dense(kvfuse_url: str, kv: KVFuseClient) -> None:
    retriever = KVFuseWarmingRetriever(retriever=KeywordRetriever(docs=DOCS), base_url=kvfuse_url)
    llm = ChatKVFuse(base_url=kvfuse_url, max_tokens=12)
    context = {"context": retriever | documents_to_messages, "question": RunnablePassthrough()}
    chain = context | _prompt() | llm

    # auto (the default) on this short prompt: exact reuse only, so dense's answer (the documented example)
    first = chain.invoke("How tall is the Eiffel Tower in Paris?")
    assert retriever.warmer.warmed == 2 and retriever.warmer.failures == 0
    auto = first.response_metadata["kvfuse"]
    assert auto["chunk_hits"] == 2, auto  # warmed standalone, hit via the fallback key
    assert auto["mode"] in ("prefix", "dense") and auto["reused_tokens"] == auto["recomputed_tokens"] == 0, auto
    assert "exact only" in (auto["fallback_reason"] or ""), auto
    first_dense = llm.invoke((context | _prompt()).invoke("How tall is the Eiffel Tower in Paris?"),
                             kvfuse={"mode": "dense"})  # fmt: skip
    assert first.content == first_dense.content, (first.content, first_dense.content)
    kv.wait_writebacks()

    # blend requested: the chunk KV is reused at new places
    question = "Which museum in Paris has the most visitors?"  # other documents' order, one new neighbour
    second = (context | _prompt() | llm.bind(kvfuse={"mode": "blend"})).invoke(question)
    info = second.response_metadata["kvfuse"]
    assert info["mode"] == "blend" and info["cached_tokens"] > 0 and info["reused_tokens"] > 0, info
    assert second.usage_metadata is not None
    assert second.usage_metadata["input_token_details"]["cache_read"] == info["cached_tokens"]
    assert second.response_metadata["cached_tokens"] == info["cached_tokens"] and second.content

    # the same request under a dense prefill: greedy text and teacher-forced top-1 agreement
    prompt_value = (context | _prompt()).invoke(question)
    dense = llm.invoke(prompt_value, kvfuse={"mode": "dense"})
    assert dense.response_metadata["kvfuse"]["mode"] == "dense"
    assert dense.response_metadata["kvfuse"]["cached_tokens"] == 0
    messages = to_openai_messages(prompt_value.to_messages())
    reuse_lp = kv.logprobs(messages, str(dense.content), top_logprobs=1, mode="blend")
    dense_lp = kv.logprobs(messages, str(dense.content), top_logprobs=1, mode="dense")
    assert reuse_lp["kvfuse"]["mode"] == "blend" and reuse_lp["kvfuse"]["reused_tokens"] > 0
    assert dense_lp["kvfuse"]["mode"] == "dense"
    agreement = top1_agreement(reuse_lp, dense_lp)
    print(f"RAG chain: auto {auto['mode']} {first.content!r} == dense; blend reuse "
          f"{info['cached_tokens']}/{info['prompt_tokens']} tokens, ttft {info['ttft_ms']} ms "
          f"(dense {dense.response_metadata['ttft_ms']} ms), top-1 agreement {agreement:.2f}, "
          f"greedy equal {second.content == dense.content}")  # fmt: skip
    assert agreement >= 0.8


def test_documents_option_reuses_after_writeback(kvfuse_url: str, kv: KVFuseClient) -> None:
    llm = ChatKVFuse(base_url=kvfuse_url, max_tokens=4)
    messages = [SystemMessage("Reply briefly."), HumanMessage("Which river flows through Peru?")]
    first = llm.invoke(messages, documents=[DOCS[2], DOCS[1].page_content])
    info = first.response_metadata["kvfuse"]
    # new system prompt and documents: no chunk KV (at most the chat template's start, exact, from the hot cache)
    assert info["chunk_hits"] == 0 and info["cached_tokens"] == info["exact_tokens"], info
    kv.wait_writebacks()
    second = llm.invoke(messages, documents=[DOCS[1].page_content, DOCS[2]], mode="blend")  # swapped order
    info = second.response_metadata["kvfuse"]
    assert info["chunk_misses"] == 0 and info["reused_tokens"] > 0 and info["mode"] == "blend", info


def test_streaming_and_async_match_invoke(kvfuse_url: str) -> None:
    llm = ChatKVFuse(base_url=kvfuse_url, max_tokens=6, mode="dense")
    messages = [HumanMessage("Name a colour of the sky.")]
    plain = llm.invoke(messages)
    chunks = list(llm.stream(messages))
    assert all(isinstance(c, AIMessageChunk) for c in chunks) and len(chunks) > 1
    total = chunks[0]
    for c in chunks[1:]:
        total = total + c
    assert total.content == plain.content
    assert total.usage_metadata is not None and plain.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == plain.usage_metadata["output_tokens"]
    assert total.response_metadata["kvfuse"]["mode"] == "dense"

    async def run() -> tuple[str, str]:
        got = await llm.ainvoke(messages)
        parts = [str(c.content) async for c in llm.astream(messages)]
        return str(got.content), "".join(parts)

    async_text, async_stream = asyncio.run(run())
    assert async_text == plain.content == async_stream


def test_async_retriever_warms_in_background(kvfuse_url: str) -> None:
    retriever = KVFuseWarmingRetriever(retriever=KeywordRetriever(docs=DOCS), base_url=kvfuse_url, background=True)
    docs = asyncio.run(retriever.ainvoke("Where is Mount Fuji in Japan?"))
    assert docs and docs[0].id == "fuji"
    retriever.warmer.flush(60)
    assert retriever.warmer.warmed == len(docs) and retriever.warmer.failures == 0


def test_unreachable_sidecar_errors_clearly(dead_url: str) -> None:
    with pytest.raises(KVFuseConnectionError, match=r"unreachable.*kvfuse serve"):
        ChatKVFuse(base_url=dead_url).invoke("hello")
    with pytest.raises(KVFuseConnectionError, match="unreachable"):
        list(ChatKVFuse(base_url=dead_url).stream("hello"))


def test_api_errors_are_raised(kvfuse_url: str) -> None:
    with pytest.raises(KVFuseAPIError) as err:
        ChatKVFuse(base_url=kvfuse_url, max_tokens=10_000).invoke("hello")
    assert err.value.status == 400 and err.value.param == "max_tokens"


@pytest.mark.parametrize("background", [False, True])
def test_warming_failure_never_breaks_retrieval(
    dead_url: str, background: bool, caplog: pytest.LogCaptureFixture
) -> None:
    inner = KeywordRetriever(docs=DOCS)
    retriever = KVFuseWarmingRetriever(retriever=inner, base_url=dead_url, background=background, timeout=2)
    with caplog.at_level(logging.WARNING, logger="kvfuse.connectors"):
        docs = retriever.invoke("How tall is the Eiffel Tower?")
        retriever.warmer.flush(30)
    assert docs == inner.invoke("How tall is the Eiffel Tower?") and docs
    assert retriever.warmer.failures == 1 and retriever.warmer.warmed == 0
    assert "unreachable" in (retriever.warmer.last_error or "")
    assert any("warming" in r.message for r in caplog.records)


def test_retriever_warms_an_in_process_engine(smollm2: LoadedModel, kvfuse_url: str) -> None:
    store = TieredStore.from_config(StoreConfig(cpu_bytes=64 << 20))
    engine = Engine(smollm2, store)
    retriever = KVFuseWarmingRetriever(retriever=KeywordRetriever(docs=DOCS, k=1), engine=engine)
    key = engine.spaces("default").chunk_key(engine.tokenize(DOCS[1].page_content), None)  # standalone
    assert not store.contains(key)
    assert retriever.invoke("Is Mount Fuji a volcano?") == [DOCS[1]]
    assert store.contains(key) and retriever.warmer.warmed == 1
    store.close()
