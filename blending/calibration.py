"""A model's calibration curve (agreement with dense per recompute budget), persisted in the store under
the model fingerprint so that every instance serving the model reads it, and a small built-in
calibration workload (multi-document QA over synthetic notes) that needs no data set."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from blending.planner import PromptSegment
from kvstore.chunk import KVChunk
from kvstore.keys import KeySpace
from kvstore.store import TieredStore

SYSTEM_NAMESPACE = "kvfuse-system"  # reserved: records of the service itself, never a tenant's


@dataclass(frozen=True)
class Calibration:
    """``curve``: recompute ratio -> mean teacher-forced top-1 agreement with dense over ``samples``
    prompts (chunks reused in a new order)."""

    fingerprint: str
    curve: Mapping[float, float]
    samples: int

    def ladder(self, target: float) -> list[float]:
        """The budgets from which on every larger one also met ``target``, smallest first (the guard
        climbs it); a noisy dip below the target at a larger budget disqualifies the smaller ones."""
        out: list[float] = []
        for r in sorted(self.curve, reverse=True):
            if self.curve[r] < target:
                break
            out.append(r)
        return out[::-1]

    def as_dict(self) -> dict[str, object]:
        return {"fingerprint": self.fingerprint, "samples": self.samples,
                "curve": {f"{r:g}": round(a, 4) for r, a in sorted(self.curve.items())}}


class CalibrationStore:
    """One record per model fingerprint and KV layout in the store's reserved namespace, encoded as a tiny
    float32 chunk: K plane = ratios, V plane = agreements, a last column (-1, samples)."""

    def __init__(self, store: TieredStore, fingerprint: str, layout: str) -> None:
        self.store, self.fingerprint = store, fingerprint
        self.key = KeySpace(fingerprint, f"{layout}:calibration", SYSTEM_NAMESPACE).chunk_key([0])

    def save(self, cal: Calibration) -> None:
        if cal.fingerprint != self.fingerprint:
            raise ValueError("a calibration belongs to the model it was measured on")
        ratios = [*sorted(cal.curve), -1.0]
        values = [*(cal.curve[r] for r in sorted(cal.curve)), float(cal.samples)]
        kv = torch.tensor([ratios, values], dtype=torch.float32).reshape(1, 2, 1, len(ratios), 1)
        self.store.delete(self.key)
        self.store.put(self.key, KVChunk(kv, torch.arange(len(ratios)), self.fingerprint))

    def load(self) -> Calibration | None:
        chunk = self.store.get(self.key)
        if chunk is None or chunk.fingerprint != self.fingerprint or tuple(chunk.kv.shape[:3]) != (1, 2, 1):
            return None
        ratios, values = chunk.kv[0, 0, 0, :, 0].tolist(), chunk.kv[0, 1, 0, :, 0].tolist()
        if not ratios or ratios[-1] != -1.0:
            return None
        curve = {round(r, 4): round(a, 4) for r, a in zip(ratios[:-1], values[:-1], strict=True) if 0.0 <= r <= 1.0}
        return Calibration(self.fingerprint, curve, int(values[-1]))


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
