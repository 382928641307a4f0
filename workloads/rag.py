"""Synthetic multi-document QA with checkable short answers.

A seeded :class:`RagCorpus` holds fluent passages; most state one fact (and maybe a near-miss fact
about a similar entity, e.g. the *south* library instead of the *north* one). Every fact key
(template, entity) is stated by exactly one document in the corpus, so a question has one answer
document and the other documents are distractors. Examples sample documents from the corpus, so
the same document text recurs across examples in new orders and next to new neighbours, which is
what a per-document KV cache reuses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from workloads import corpus as C

TEMPLATES = ("access_code", "birthplace", "colour", "founded")
SYSTEM_PROMPT = "Answer the question with the fact from the documents. Reply with a short answer."


@dataclass(frozen=True)
class Fact:
    template: str
    entity: str  # unique per template within a corpus
    sentence: str
    question: str
    answer: str
    aliases: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.template, self.entity)


@dataclass(frozen=True)
class RagDocument:
    doc_id: int
    text: str
    fact: Fact | None = None  # the fact a question may ask about
    facts: tuple[Fact, ...] = ()  # every fact the text states (``fact`` plus near misses)


@dataclass(frozen=True)
class RagExample:
    documents: tuple[str, ...]
    question: str
    answer: str
    aliases: tuple[str, ...]
    answer_doc: int  # index into ``documents``
    template: str
    doc_ids: tuple[int, ...] = ()  # corpus ids of ``documents`` (the cache key of each document)


# ---------------------------------------------------------------- facts


def _fact(template: str, entity: tuple[str, ...], rng: random.Random) -> Fact:
    if template == "access_code":
        (place,) = entity
        code = str(rng.randint(1000, 9999))
        return Fact(template, place, f"The access code of the {place} is {code}.",
                    f"What is the access code of the {place}?", code)
    if template == "colour":
        obj, place = entity
        colour = rng.choice(C.COLOURS)
        return Fact(template, f"{obj} in the {place}", f"The {obj} in the {place} is painted {colour}.",
                    f"What colour is the {obj} in the {place}?", colour, C.COLOUR_ALIASES.get(colour, ()))
    if template == "birthplace":
        (person,) = entity
        city = rng.choice(C.CITIES)
        return Fact(template, person, f"{person} was born in {city}.", f"In which city was {person} born?",
                    city, C.CITY_ALIASES.get(city, ()))
    if template == "founded":
        (company,) = entity
        year = str(rng.randint(1850, 2015))
        return Fact(template, company, f"{company} was founded in {year}.",
                    f"In which year was {company} founded?", year)
    raise ValueError(f"unknown template {template!r}; known: {TEMPLATES}")


def _entities(template: str, rng: random.Random) -> list[tuple[str, ...]]:
    places = [f"{a} {b}" for a in C.PLACE_ADJ for b in C.BUILDINGS]
    pools: dict[str, list[tuple[str, ...]]] = {
        "access_code": [(p,) for p in places],
        "colour": [(o, p) for o in C.OBJECTS for p in places],
        "birthplace": [(f"{f} {last}",) for f in C.FIRST_NAMES for last in C.LAST_NAMES],
    }
    if template == "founded":  # every head once before any head twice: similar names confuse the model
        heads, tails = list(C.COMPANY_HEADS), list(C.COMPANY_TAILS)
        rng.shuffle(heads)
        rng.shuffle(tails)
        rounds = [[(f"{h} {tails[(k + r) % len(tails)]}",) for k, h in enumerate(heads)] for r in range(len(tails))]
        return [e for batch in reversed(rounds) for e in batch]  # popped from the end
    pool = pools[template]
    rng.shuffle(pool)
    return pool


def _similar(template: str, a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Near-miss entity: same building, same place, same first name or any other company."""
    if template == "colour":
        return a[1] == b[1]
    if template == "access_code":
        return a[0].split()[1] == b[0].split()[1]
    return a[0].split()[0] == b[0].split()[0] or template == "founded"


_NEAR_MISS_LEAD = {"birthplace": "A cousin, {s}", "founded": "Its old rival, {s}"}


def _topic(template: str, entity: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    if template in ("access_code", "colour"):
        return "place", {"place": entity[-1]}
    if template == "birthplace":
        return "person", {"person": entity[0], "first": entity[0].split()[0]}
    return "company", {"company": entity[0]}


# ---------------------------------------------------------------- corpus


@dataclass(frozen=True)
class RagCorpus:
    """A seeded, reusable set of documents; ``documents[i].doc_id == i``."""

    documents: tuple[RagDocument, ...]
    doc_tokens: int
    seed: int

    @classmethod
    def build(cls, size: int, *, doc_tokens: int = 100, seed: int = 0, templates: Sequence[str] | None = None,
              fact_fraction: float = 0.8, near_miss: float = 0.5) -> RagCorpus:
        """``size`` documents of about ``doc_tokens`` tokens; a ``fact_fraction`` share states a fact,
        of which a ``near_miss`` share also states a fact about a similar entity."""
        templates = tuple(templates or TEMPLATES)
        if unknown := set(templates) - set(TEMPLATES):
            raise ValueError(f"unknown templates {sorted(unknown)}; known: {TEMPLATES}")
        rng = random.Random(f"rag-corpus-{seed}")
        free = {t: _entities(t, rng) for t in templates}
        n_words = C.target_words(doc_tokens)
        docs: list[RagDocument] = []
        for doc_id in range(size):
            live = [t for t in templates if free[t]]
            if not live or rng.random() >= fact_fraction:
                kind = rng.choice(("place", "person", "company"))
                topic = {"place": f"{rng.choice(C.PLACE_ADJ)} {rng.choice(C.BUILDINGS)}",
                         "person": f"{rng.choice(C.FIRST_NAMES)} {rng.choice(C.LAST_NAMES)}",
                         "company": f"{rng.choice(C.COMPANY_HEADS)} {rng.choice(C.COMPANY_TAILS)}"}
                topic["first"] = topic["person"].split()[0]
                docs.append(RagDocument(doc_id, C.passage(rng, kind, topic, n_words)))
                continue
            template = rng.choice(live)
            entity = free[template].pop()
            fact = _fact(template, entity, rng)
            facts = [fact]
            if rng.random() < near_miss:
                idx = next((i for i, e in enumerate(free[template]) if _similar(template, entity, e)), None)
                if idx is not None:
                    other = _fact(template, free[template].pop(idx), rng)
                    lead = _NEAR_MISS_LEAD.get(template)
                    if lead:  # "A cousin, Maria Novak, was born in Oslo."
                        subject, _, rest = other.sentence.partition(" was ")
                        other = Fact(other.template, other.entity, lead.format(s=subject) + ", was " + rest,
                                     other.question, other.answer, other.aliases)
                    facts.append(other)
            kind, topic = _topic(template, entity)
            text = C.passage(rng, kind, topic, n_words, tuple(f.sentence for f in facts))
            docs.append(RagDocument(doc_id, text, fact, tuple(facts)))
        return cls(tuple(docs), doc_tokens, seed)

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def fact_doc_ids(self) -> tuple[int, ...]:
        return tuple(d.doc_id for d in self.documents if d.fact is not None)

    def example(self, doc_ids: Sequence[int], rng: random.Random, answer_id: int | None = None) -> RagExample:
        """An example over the documents ``doc_ids`` (in that order), asking about the fact of
        ``answer_id`` (default: a random fact document among them)."""
        if answer_id is None:
            candidates = [i for i in doc_ids if self.documents[i].fact is not None]
            if not candidates:
                raise ValueError("no document with a fact among doc_ids")
            answer_id = rng.choice(candidates)
        fact = self.documents[answer_id].fact
        if fact is None:
            raise ValueError(f"document {answer_id} states no fact")
        return RagExample(documents=tuple(self.documents[i].text for i in doc_ids), question=fact.question,
                          answer=fact.answer, aliases=fact.aliases, answer_doc=list(doc_ids).index(answer_id),
                          template=fact.template, doc_ids=tuple(doc_ids))

    def sample_example(self, num_docs: int, rng: random.Random, templates: Sequence[str] | None = None) -> RagExample:
        """A random answer document (optionally restricted to ``templates``) plus distractors, shuffled."""
        pool = [d.doc_id for d in self.documents
                if d.fact is not None and (templates is None or d.fact.template in templates)]
        if not pool or num_docs > len(self):
            raise ValueError("corpus too small for the requested examples")
        answer_id = rng.choice(pool)
        others = rng.sample([i for i in range(len(self)) if i != answer_id], num_docs - 1)
        doc_ids = [answer_id, *others]
        rng.shuffle(doc_ids)
        return self.example(doc_ids, rng, answer_id)


def make_rag_examples(n: int, *, num_docs: int = 6, doc_tokens: int = 100, seed: int = 0,
                      templates: Sequence[str] | None = None, corpus: RagCorpus | None = None) -> list[RagExample]:
    """``n`` examples of ``num_docs`` documents each, drawn from ``corpus`` (default: a seeded corpus
    sized so that every document recurs in several examples)."""
    if corpus is None:
        size = min(1000, max(8 * num_docs, n * num_docs // 4))
        corpus = RagCorpus.build(size, doc_tokens=doc_tokens, seed=seed, templates=templates)
    rng = random.Random(f"rag-examples-{seed}")
    return [corpus.sample_example(num_docs, rng, templates) for _ in range(n)]


def check_answer(example: RagExample, text: str) -> bool:
    """Normalised whole-word containment of the answer or an alias in ``text``."""
    return C.contains_answer(text, (example.answer, *example.aliases))


def render_prompt_messages(example: RagExample, *,
                           question_position: Literal["before", "after", "both"] = "after") -> list[dict[str, str]]:
    """Reference chat rendering: a system message, then the documents and the question."""
    docs = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(example.documents))
    question = f"Question: {example.question}"
    parts = {"before": [question, docs], "after": [docs, question], "both": [question, docs, question]}
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": "\n\n".join(parts[question_position])}]
