"""Re-rotating cached keys equals computing them at the new positions."""

from __future__ import annotations

import torch

from blending.adapter import ModelAdapter
from blending.model import LoadedModel
from blending.rope import rerotate
from tests.blending.conftest import tiny_model


def _layer0_keys(adapter: ModelAdapter, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        _, k, _ = adapter.project_qkv(0, adapter.embed(ids), positions)
    return k


def test_rerotate_smollm2_layer0(smollm2: LoadedModel) -> None:
    adapter = ModelAdapter(smollm2.model)
    ids = smollm2.tokenizer("Bob was born in Rome and moved to Oslo.", return_tensors="pt")["input_ids"][0]
    n = len(ids)
    at_p = _layer0_keys(adapter, ids, torch.arange(7, 7 + n))
    at_q = _layer0_keys(adapter, ids, torch.arange(300, 300 + n))
    moved = rerotate(at_p, torch.arange(7, 7 + n), torch.arange(300, 300 + n), adapter.inv_freq)
    torch.testing.assert_close(moved, at_q, atol=2e-4, rtol=1e-4)
    back = rerotate(moved, torch.arange(300, 300 + n), torch.arange(7, 7 + n), adapter.inv_freq)
    torch.testing.assert_close(back, at_p, atol=2e-4, rtol=1e-4)


def test_rerotate_with_rope_scaling() -> None:
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    adapter = ModelAdapter(tiny_model("llama", rope))
    ids = torch.randint(0, 256, (12,))
    at_p = _layer0_keys(adapter, ids, torch.arange(12))
    at_q = _layer0_keys(adapter, ids, torch.arange(400, 412))
    moved = rerotate(at_p, torch.arange(12), torch.arange(400, 412), adapter.inv_freq)
    torch.testing.assert_close(moved, at_q, atol=1e-4, rtol=1e-4)


def test_rerotate_keeps_dtype_and_noop() -> None:
    k = torch.randn(2, 5, 8, dtype=torch.bfloat16)
    pos = torch.arange(5)
    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert rerotate(k, pos, pos, inv) is k
    assert rerotate(k, pos, pos + 3, inv).dtype == torch.bfloat16
