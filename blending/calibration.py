"""A model's calibration curve (the share of answers kept equal to dense's per recompute budget),
persisted in the store under the model fingerprint so that every instance serving the model reads it,
and a small built-in calibration workload (multi-document QA over synthetic notes) that needs no data set."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from blending.planner import PromptSegment
from kvstore.chunk import KVChunk
from kvstore.keys import KeySpace
from kvstore.store import TieredStore

SYSTEM_NAMESPACE = "kvfuse-system"  # reserved: records of the service itself, never a tenant's


@dataclass(frozen=True)
class Calibration:
    """``curve``: recompute ratio -> share of the ``samples`` calibration prompts (chunks reused in a new
    order) whose greedy answer of up to ``answer_tokens`` tokens equals dense's token for token: what
    ``auto`` decides by. ``agreement``: teacher-forced top-1 agreement per ratio, for information only: it
    stays near 1.0 where answers already differ, because one changed token changes the rest of a greedy
    answer and teacher forcing never follows it."""

    fingerprint: str
    curve: Mapping[float, float]
    samples: int
    agreement: Mapping[float, float] = field(default_factory=dict)
    answer_tokens: int = 0

    def ladder(self, target: float) -> list[float]:
        """The budgets from which on every larger one also met ``target``, smallest first (the guard
        climbs it); a noisy dip below the target at a larger budget disqualifies the smaller ones, except
        at 1.0: recomputing everything is a dense prefill in another float order, so its rare misses are
        rounding at near-ties, not reuse."""
        out: list[float] = []
        for r in sorted(self.curve, reverse=True):
            if self.curve[r] < target:
                if r >= 1.0:
                    continue
                break
            out.append(r)
        return out[::-1]

    def as_dict(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "samples": self.samples, "answer_tokens": self.answer_tokens,
                "measure": "same greedy answer as dense",
                "curve": {f"{r:g}": round(a, 4) for r, a in sorted(self.curve.items())},
                "agreement": {f"{r:g}": round(a, 4) for r, a in sorted(self.agreement.items())}}

    @classmethod
    def from_dict(cls, fingerprint: str, data: Mapping[str, Any]) -> Calibration:
        """The inverse of :meth:`as_dict` (for ``fingerprint``); refuses a curve of an older kvfuse, which
        held teacher-forced agreement where this one holds kept answers."""
        if "answer_tokens" not in data or "agreement" not in data:
            raise ValueError("this calibration holds top-1 agreement (an older kvfuse), not kept answers: "
                             "measure it again")
        return cls(fingerprint, {float(r): float(a) for r, a in data["curve"].items()}, int(data["samples"]),
                   {float(r): float(a) for r, a in data["agreement"].items()}, int(data["answer_tokens"]))


class CalibrationStore:
    """One record per model fingerprint and KV layout in the store's reserved namespace, encoded as a tiny
    float32 chunk of two heads (K plane = ratios; V plane = kept answers in head 0, agreement in head 1,
    NaN where not measured) and a last column (-1; samples, answer_tokens). The key names the record's
    version: a record of an older kvfuse (agreement only) is never read as kept answers."""

    def __init__(self, store: TieredStore, fingerprint: str, layout: str) -> None:
        self.store, self.fingerprint = store, fingerprint
        self.key = KeySpace(fingerprint, f"{layout}:calibration-v2", SYSTEM_NAMESPACE).chunk_key([0])

    def save(self, cal: Calibration) -> None:
        if cal.fingerprint != self.fingerprint:
            raise ValueError("a calibration belongs to the model it was measured on")
        ratios = sorted(cal.curve)
        kept = [*(cal.curve[r] for r in ratios), float(cal.samples)]
        agree = [*(cal.agreement.get(r, math.nan) for r in ratios), float(cal.answer_tokens)]
        keys = [*ratios, -1.0]
        kv = torch.tensor([[keys, keys], [kept, agree]], dtype=torch.float32)[None, ..., None]
        self.store.delete(self.key)
        self.store.put(self.key, KVChunk(kv, torch.arange(len(keys)), self.fingerprint))

    def load(self) -> Calibration | None:
        chunk = self.store.get(self.key)
        if chunk is None or chunk.fingerprint != self.fingerprint or tuple(chunk.kv.shape[:3]) != (1, 2, 2):
            return None
        ratios, kept, agree = chunk.kv[0, 0, 0, :, 0].tolist(), chunk.kv[0, 1, 0, :, 0].tolist(), \
            chunk.kv[0, 1, 1, :, 0].tolist()
        if not ratios or ratios[-1] != -1.0:
            return None
        rows = [(round(r, 4), k, a) for r, k, a in zip(ratios[:-1], kept[:-1], agree[:-1], strict=True)
                if 0.0 <= r <= 1.0]
        return Calibration(self.fingerprint, {r: round(k, 4) for r, k, _ in rows}, int(kept[-1]),
                           {r: round(a, 4) for r, _, a in rows if not math.isnan(a)}, int(agree[-1]))


_NAMES = ["Arden", "Belmor", "Castrel", "Dunwick", "Elsmere", "Fenholt", "Garrow", "Halvik", "Istra", "Jorvale",
          "Kestwin", "Lorimer", "Marlow", "Norcast", "Orvell", "Pellam", "Quarry", "Rosmund", "Selwick", "Tarrin"]
_THINGS = [("was founded in", "year", lambda r: str(r.randint(1820, 2015))),
           ("has a population of", "population", lambda r: f"{r.randint(2, 900) * 1000:,}"),
           ("is known for its", "product", lambda r: r.choice(["glass", "cheese", "clocks", "silk", "ships", "tea"])),
           ("lies on the river", "river", lambda r: r.choice(["Aune", "Brenna", "Coll", "Dessa", "Evor", "Fane"]))]

_FILLER = ["The old market square is busy on weekends.", "Visitors often arrive by train from the coast.",
           "The town hall was rebuilt after a fire in the last century.", "Winters there are long but mild.",
           "A small museum shows tools used by the first settlers.", "Most families keep a garden behind the house.",
           "The local football club has never won the regional cup.", "A ferry crosses the water twice a day.",
           "The library opens late on Thursdays for students.", "Farmers sell apples and honey at the gate."]


def calibration_prompts(count: int, docs: int = 6, seed: int = 0) -> list[tuple[list[str], str, str]]:
    """``count`` multi-document questions: (documents, question, system prompt), each document a short
    note about a fictitious town, the question about one of them."""
    rng = random.Random(seed)
    system = "You answer questions using only the documents given. Answer briefly."
    out = []
    for _ in range(count):
        towns = rng.sample(_NAMES, docs)
        notes, facts = [], {}
        for town in towns:
            picked = [(verb, what, value(rng)) for verb, what, value in rng.sample(_THINGS, 3)]
            facts[town] = picked
            filler = rng.sample(_FILLER, 4)
            notes.append(" ".join([*(f"{town} {verb} {val}." for verb, _, val in picked), *filler]))
        town = rng.choice(towns)
        verb, what, _ = rng.choice(facts[town])
        out.append((notes, f"According to the documents, {town} {verb} which {what}?", system))
    return out


_SENTINEL = "\x00KVFUSE-DOC-{}\x00"


def document_segments(tokenizer: Any, system: str, documents: Sequence[str], question: str,
                      ) -> tuple[PromptSegment, ...]:
    """The model's chat template around documents (each a reusable chunk) and a question. The text up to
    the first document is the exact prefix; the ``Document i:`` headers are glue text, computed."""
    docs = "".join(f"Document {i + 1}:\n{_SENTINEL.format(i)}" for i in range(len(documents)))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": f"{docs}Question: {question}"}]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    segments: list[PromptSegment] = []
    for i, doc in enumerate(documents):
        head, text = text.split(_SENTINEL.format(i), 1)
        segments.append(PromptSegment(head, "prefix" if i == 0 else "text"))
        segments.append(PromptSegment(doc.rstrip() + "\n\n", "chunk"))
    segments.append(PromptSegment(text))
    return tuple(segments)


def new_order(count: int, rng: random.Random) -> list[int]:
    """A permutation of ``range(count)`` whose first element moves (so no document stays an exact prefix)."""
    order = list(range(count))
    while count > 1 and order[0] == 0:
        rng.shuffle(order)
    return order
