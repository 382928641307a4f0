"""SGLang HiCache pages in kvfuse: shard suffixes, page specs and keys, host-layout conversion.

A page's kvfuse key comes from :meth:`kvstore.keys.KeySpace.engine_key`: SGLang's own page hash plus the
shard suffix of its file backend, in the key space of (model identity, page layout with KV dtype, kvfuse
namespace). The model identity is kvfuse's weight fingerprint when the backend is configured with
``kvfuse_fingerprint``, else the served model name (``"name:<model>"``: SGLang exposes nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from connectors.common import model_identity
from kvstore.chunk import SUPPORTED_DTYPES, dtype_name
from kvstore.keys import ChunkKey, KeySpace

__all__ = [
    "MHA_LAYOUTS",
    "MLA_LAYOUTS",
    "SGLangPageSpec",
    "flat_shape",
    "page_from_flat",
    "page_to_flat",
    "shard_suffix",
]

MHA_LAYOUTS = ("layer_first", "page_first", "page_first_direct", "page_head")
MLA_LAYOUTS = ("layer_first", "page_first", "page_first_direct")


def shard_suffix(
    model_name: str | None,
    *,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    attn_cp_rank: int = 0,
    attn_cp_size: int = 1,
    is_mla: bool = False,
) -> str:
    """The per-shard key suffix SGLang's own file backend appends (``HiCacheFile.config_suffix``)."""
    model = "-".join(model_name.split("/")) if model_name else ""
    shard = f"_{pp_size}_{pp_rank}" if pp_size > 1 else ""
    if attn_cp_size > 1:
        shard += f"_cp{attn_cp_rank}_{attn_cp_size}"
    return f"_{model}{shard}" if is_mla else f"_{model}_{tp_rank}_{tp_size}{shard}"


@dataclass(frozen=True)
class SGLangPageSpec:
    """What a stored page is: one shard's geometry and the key suffix of that shard.

    MHA: ``head_num`` KV heads of this shard (total / tp_size) of ``head_dim``; MLA: ``head_num`` is 1 and
    ``head_dim`` is ``kv_cache_dim`` (latent + rope dims).
    """

    layer_num: int
    head_num: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    suffix: str
    is_mla: bool = False
    namespace: str = "default"
    model_name: str = ""
    model_fingerprint: str | None = None  # kvfuse's weight fingerprint; None: identified by model_name

    def __post_init__(self) -> None:
        if min(self.layer_num, self.head_num, self.head_dim, self.page_size) <= 0:
            raise ValueError(f"invalid page geometry {self}")
        if self.dtype not in SUPPORTED_DTYPES.values():
            raise ValueError(
                f"kvfuse stores {sorted(SUPPORTED_DTYPES)} KV; the SGLang KV cache is {self.dtype} "
                "(run SGLang with --kv-cache-dtype auto on a float16/bfloat16/float32 model)"
            )
        if self.is_mla and (self.head_num != 1 or self.head_dim % 2):
            raise ValueError("an MLA page has one latent head of even width")

    @property
    def fingerprint(self) -> str:
        """The model identity of the stored pages (see :func:`connectors.common.model_identity`)."""
        return model_identity(self.model_fingerprint, self.model_name)

    @property
    def page_numel(self) -> int:
        return self.layer_num * self.page_size * self.head_num * self.head_dim * (1 if self.is_mla else 2)

    @property
    def layout(self) -> str:
        """The page layout with its dtype, e.g. ``sglang/mha/l30h3d64p64:bfloat16``."""
        kind = "mla" if self.is_mla else "mha"
        geometry = f"l{self.layer_num}h{self.head_num}d{self.head_dim}p{self.page_size}"
        return f"sglang/{kind}/{geometry}:{dtype_name(self.dtype)}"

    def key(self, page_key: str) -> ChunkKey:
        """kvfuse key of SGLang page ``page_key`` (SGLang's page hash) in this shard (suffix), from
        :meth:`kvstore.keys.KeySpace.engine_key` over (model identity, layout with dtype, kvfuse namespace)."""
        return KeySpace(self.fingerprint, self.layout, self.namespace).engine_key("sglang", page_key + self.suffix)


def flat_shape(spec: SGLangPageSpec, layout: str) -> tuple[int, ...]:
    L, P, H, D = spec.layer_num, spec.page_size, spec.head_num, spec.head_dim
    if spec.is_mla:
        shapes = {"layer_first": (L, P, 1, D), "page_first": (P, L, 1, D), "page_first_direct": (1, L, P, 1, D)}
    else:
        shapes = {
            "layer_first": (2, L, P, H, D),
            "page_first": (2, P, L, H, D),
            "page_first_direct": (2, 1, L, P, H, D),
            "page_head": (2, 1, H, P, L, D),
        }
    if layout not in shapes:
        raise ValueError(f"unsupported SGLang host layout {layout!r} for {'MLA' if spec.is_mla else 'MHA'} pages")
    return shapes[layout]


def page_from_flat(flat: torch.Tensor, spec: SGLangPageSpec, layout: str) -> torch.Tensor:
    """A flat host-pool page (as ``get_data_page(i, flat=True)`` gives it) → canonical ``[L, 2, H, P, D]``."""
    if flat.numel() != spec.page_numel:
        raise ValueError(f"page has {flat.numel()} elements, expected {spec.page_numel}")
    x = flat.reshape(flat_shape(spec, layout))
    if spec.is_mla:
        lpc = {"layer_first": x[:, :, 0], "page_first": x[:, :, 0].transpose(0, 1), "page_first_direct": x[0, :, :, 0]}
        lat = lpc[layout]  # [L, P, C]
        L, P, C = lat.shape
        return lat.reshape(L, P, 2, C // 2).permute(0, 2, 1, 3).unsqueeze(2).contiguous()
    if layout == "layer_first":
        kv = x.permute(1, 0, 3, 2, 4)
    elif layout == "page_first":
        kv = x.permute(2, 0, 3, 1, 4)
    elif layout == "page_first_direct":
        kv = x[:, 0].permute(1, 0, 3, 2, 4)
    else:  # page_head: [2, H, P, L, D]
        kv = x[:, 0].permute(3, 0, 1, 2, 4)
    return kv.contiguous()


def page_to_flat(kv: torch.Tensor, spec: SGLangPageSpec, layout: str) -> torch.Tensor:
    """Canonical ``[L, 2, H, P, D]`` → the flat page ``set_from_flat_data_page`` expects for ``layout``."""
    if spec.is_mla:
        L, _, _, P, half = kv.shape
        lat = kv[:, :, 0].permute(0, 2, 1, 3).reshape(L, P, 2 * half)  # [L, P, C]
        if layout == "layer_first":
            x = lat[:, :, None]
        elif layout == "page_first":
            x = lat.transpose(0, 1)[:, :, None]
        elif layout == "page_first_direct":
            x = lat[None, :, :, None]
        else:
            flat_shape(spec, layout)  # raises
            raise AssertionError
        return x.contiguous().flatten()
    if layout == "layer_first":
        x = kv.permute(1, 0, 3, 2, 4)
    elif layout == "page_first":
        x = kv.permute(1, 3, 0, 2, 4)
    elif layout == "page_first_direct":
        x = kv.permute(1, 0, 3, 2, 4)[:, None]
    elif layout == "page_head":
        x = kv.permute(1, 2, 3, 0, 4)[:, None]
    else:
        flat_shape(spec, layout)
        raise AssertionError
    return x.contiguous().flatten()
