"""Unit tests of the synthetic RAG workload (no model)."""

from __future__ import annotations

import random

import pytest

from workloads.rag import TEMPLATES, RagCorpus, check_answer, make_rag_examples, render_prompt_messages


def test_deterministic_and_seeded() -> None:
    assert make_rag_examples(10, seed=3) == make_rag_examples(10, seed=3)
    assert make_rag_examples(10, seed=3) != make_rag_examples(10, seed=4)


def test_answer_in_answer_doc_only() -> None:
    corpus = RagCorpus.build(120, seed=1)
    for ex in make_rag_examples(60, seed=1, corpus=corpus):
        assert len(ex.documents) == 6 and len(ex.doc_ids) == 6
        assert ex.documents == tuple(corpus.documents[i].text for i in ex.doc_ids)
        fact = corpus.documents[ex.doc_ids[ex.answer_doc]].fact
        assert fact is not None and (fact.question, fact.answer) == (ex.question, ex.answer)
        assert fact.sentence in ex.documents[ex.answer_doc] and check_answer(ex, fact.sentence)
        for i, doc_id in enumerate(ex.doc_ids):
            if i != ex.answer_doc:
                assert fact.sentence not in ex.documents[i]
                assert all(f.key != fact.key for f in corpus.documents[doc_id].facts)


def test_corpus_fact_keys_unique_and_docs_recur() -> None:
    corpus = RagCorpus.build(300, seed=2)
    keys = [f.key for d in corpus.documents for f in d.facts]
    assert len(keys) == len(set(keys))
    assert all(d.doc_id == i for i, d in enumerate(corpus.documents))
    assert {d.fact.template for d in corpus.documents if d.fact} == set(TEMPLATES)
    assert any(len(d.facts) == 2 for d in corpus.documents)  # near misses exist
    examples = make_rag_examples(40, seed=2)
    ids = [i for ex in examples for i in ex.doc_ids]
    assert len(set(ids)) < len(ids) / 2  # the same documents recur across examples


def test_doc_length_roughly_doc_tokens() -> None:
    for doc_tokens in (60, 100, 200):
        corpus = RagCorpus.build(50, doc_tokens=doc_tokens, seed=0)
        mean_words = sum(len(d.text.split()) for d in corpus.documents) / len(corpus)
        assert 0.6 * doc_tokens < mean_words < 0.95 * doc_tokens


def test_templates_filter_and_example_from_ids() -> None:
    examples = make_rag_examples(20, seed=0, templates=["colour"])
    assert {ex.template for ex in examples} == {"colour"}
    corpus = RagCorpus.build(40, seed=0)
    ids = [d.doc_id for d in corpus.documents[:5]]
    ex = corpus.example(ids, random.Random(0))
    assert ex.doc_ids == tuple(ids) and corpus.documents[ids[ex.answer_doc]].fact is not None
    with pytest.raises(ValueError):
        make_rag_examples(2, templates=["nope"])


def test_check_answer() -> None:
    corpus = RagCorpus.build(400, seed=0)
    grey = next(d.doc_id for d in corpus.documents if d.fact and d.fact.answer == "grey")
    ex = corpus.example([grey], random.Random(0))
    assert ex.aliases == ("gray",)
    assert check_answer(ex, "It is painted Grey.") and check_answer(ex, "gray")
    assert not check_answer(ex, "It is painted green.") and not check_answer(ex, "greyish")
    code = next(ex for ex in make_rag_examples(30, seed=0) if ex.template == "access_code")
    assert check_answer(code, f"The code is {code.answer}.")
    assert not check_answer(code, f"The code is {code.answer}1.") and not check_answer(code, "")


def test_render_prompt_messages() -> None:
    ex = make_rag_examples(1, seed=0)[0]
    for pos in ("before", "after", "both"):
        msgs = render_prompt_messages(ex, question_position=pos)
        assert [m["role"] for m in msgs] == ["system", "user"]
        user = msgs[1]["content"]
        assert all(d in user for d in ex.documents) and ex.question in user
    after = render_prompt_messages(ex, question_position="after")[1]["content"]
    assert after.endswith(ex.question) or ex.question in after.split("Document")[-1]
