"""The layer-wise adapter reproduces the Hugging Face model's own forward."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from blending.adapter import ModelAdapter, UnsupportedModelError
from blending.model import LoadedModel
from tests.blending.conftest import tiny_model

ROPES = [
    None,
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "dynamic", "factor": 2.0},
]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_dense_forward_matches_hf(family: str) -> None:
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 256, (37,))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    kv, logits = adapter.prefill(ids)
    assert kv.shape == (3, 2, 2, 37, 16)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", ROPES[1:], ids=lambda r: r["rope_type"])
def test_rope_scaling_is_honoured(rope: dict[str, object]) -> None:
    model = tiny_model("llama", rope)
    adapter = ModelAdapter(model)
    assert adapter.rope_type == rope["rope_type"]
    ids = torch.randint(0, 256, (200,))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    _, logits = adapter.prefill(ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_sliding_window_matches_hf() -> None:
    model = tiny_model("mistral", sliding_window=8)
    adapter = ModelAdapter(model)
    assert adapter.windows == [8, 8, 8]
    ids = torch.randint(0, 256, (40,))
    with torch.inference_mode():
        ref = model(ids[None]).logits[0]
    _, logits = adapter.prefill(ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_equals_whole() -> None:
    adapter = ModelAdapter(tiny_model("qwen2"))
    ids = torch.randint(0, 256, (50,))
    kv, logits = adapter.prefill(ids)
    past, _ = adapter.prefill(ids[:20])
    kv2, logits2 = adapter.prefill(ids[20:], past_kv=past)
    torch.testing.assert_close(kv2, kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits2, logits[20:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_prefill_into_one_buffer_equals_whole(family: str) -> None:
    """The dense path writes every piece into one pre-allocated buffer and computes the last token's
    logits only: same KV and last logits as one whole prefill, and as HF's forward."""
    model = tiny_model(family, sliding_window=8) if family == "mistral" else tiny_model(family)
    adapter = ModelAdapter(model)
    ids = torch.randint(0, 256, (50,))
    kv, logits = adapter.prefill(ids)
    buffer = adapter.empty_kv(50)
    for start in range(0, 50, 16):
        last = adapter.prefill_into(buffer, start, ids[start : start + 16])
    torch.testing.assert_close(buffer, kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.prefill_kv(ids), kv, atol=1e-5, rtol=1e-5)  # KV alone, no LM head
    assert last.shape == (adapter.shape.vocab_size,) and last.dtype == torch.float32
    torch.testing.assert_close(last, logits[-1], atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(last, model(ids[None]).logits[0, -1].float(), atol=1e-4, rtol=1e-4)


def test_smollm2_matches_hf(smollm2: LoadedModel) -> None:
    adapter = ModelAdapter(smollm2.model)
    assert adapter.shape.num_layers == 30 and adapter.shape.num_kv_heads == 3 and adapter.shape.head_dim == 64
    ids = smollm2.tokenizer("The capital of France is Paris. It is known for", return_tensors="pt")["input_ids"][0]
    with torch.inference_mode():
        ref = smollm2.model(ids[None]).logits[0]
    _, logits = adapter.prefill(ids)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_unknown_architecture_refused() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        ModelAdapter(model)


def test_partial_rotary_and_unknown_rope_refused() -> None:
    model = tiny_model("llama")
    model.config.partial_rotary_factor = 0.5
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        ModelAdapter(model)
    model = tiny_model("llama")
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelAdapter(model)
