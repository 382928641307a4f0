"""What the vLLM connector's scheduler hands its workers each step, and layer indices from layer names."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockLoad", "BlockSave", "KvfuseConnectorMetadata", "SaveProgress", "layer_index"]


@dataclass
class BlockLoad:
    """Blocks to load for one request: vLLM block hashes (each worker keys them with its own TP rank)."""

    req_id: str
    block_hashes: list[bytes]
    block_ids: list[int]
    prepared_id: str | None = None


@dataclass
class BlockSave:
    """Consecutive full prompt blocks to save for one request, the first starting at token ``start_token``."""

    req_id: str
    block_hashes: list[bytes]
    block_ids: list[int]
    start_token: int


@dataclass
class SaveProgress:
    """Scheduler-side save state of one request: its block ids so far, and how many leading blocks are done."""

    block_ids: list[int]
    planned: int


@dataclass
class KvfuseConnectorMetadata:
    """What the worker loads and saves this step (a ``KVConnectorMetadata`` in the built class)."""

    loads: list[BlockLoad] = field(default_factory=list)
    saves: list[BlockSave] = field(default_factory=list)


def layer_index(layer_name: str) -> int:
    """The layer index in a vLLM attention layer name: its one integer component (``model.layers.12.attn`` -> 12)."""
    ints = [int(part) for part in layer_name.split(".") if part.isdigit()]
    if len(ints) != 1:
        raise ValueError(
            f"kvfuse cannot tell the layer index of KV cache {layer_name!r}: expected exactly one integer "
            "component in the name (as in 'model.layers.12.self_attn.attn')"
        )
    return ints[0]
