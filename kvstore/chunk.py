"""The unit the store holds: the KV of one chunk of tokens, with the positions it was computed at."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical name of a supported dtype ("float32", "float16", "bfloat16")."""
    for name, value in SUPPORTED_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}; supported: {sorted(SUPPORTED_DTYPES)}")


@dataclass(frozen=True)
class KVChunk:
    """Per-layer K and V of ``T`` tokens.

    Layout: ``kv`` is ``[layers, 2, kv_heads, T, head_dim]`` (index 0 = K post-RoPE, 1 = V),
    ``positions`` is int64 ``[T]``: the rotary positions the keys were computed at.
    ``fingerprint`` names the model (see ``blending.model``); KV of two models never mixes.
    """

    kv: torch.Tensor
    positions: torch.Tensor
    fingerprint: str

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, kv_heads, T, head_dim], got {tuple(self.kv.shape)}")
        dtype_name(self.kv.dtype)
        if self.positions.dim() != 1 or self.positions.shape[0] != self.kv.shape[3]:
            raise ValueError(
                f"positions must be [T={self.kv.shape[3]}], got {tuple(self.positions.shape)}"
            )
        if self.positions.dtype != torch.int64:
            object.__setattr__(self, "positions", self.positions.to(torch.int64))

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.kv.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def head_dim(self) -> int:
        return int(self.kv.shape[4])

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of tensor payload (KV plus positions)."""
        return self.kv.numel() * self.kv.element_size() + self.positions.numel() * 8

    def to(self, device: torch.device | str, non_blocking: bool = False) -> KVChunk:
        """The same chunk on another device (no copy when already there)."""
        return KVChunk(
            self.kv.to(device, non_blocking=non_blocking),
            self.positions.to(device, non_blocking=non_blocking),
            self.fingerprint,
        )
