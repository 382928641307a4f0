"""Small random-initialized models of each supported family (real transformers classes, random weights)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config, Qwen3Config

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(family: str, rope: dict[str, Any] | None = None, **extra: Any) -> PretrainedConfig:
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    kwargs = dict(_COMMON, **extra)
    if family == "qwen3":
        kwargs["head_dim"] = 16
    config = cls(**kwargs)
    if rope is not None:
        config.rope_parameters = {"rope_theta": 10000.0, **rope}
    return config


def tiny_model(family: str, rope: dict[str, Any] | None = None, seed: int = 0, **extra: Any) -> Any:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, rope, **extra), dtype=torch.float32)
    return model.eval()
