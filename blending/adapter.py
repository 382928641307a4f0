"""Layer-wise access to a Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3 families).

The blending code drives the model one layer at a time over an arbitrary subset of tokens that
attend over a shared KV buffer; this adapter exposes exactly that, reusing the model's own modules
(projections, norms, rotary embedding incl. its scaling, MLP) so results match HF to float tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from blending.rope import rotate_half

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


class UnsupportedModelError(ValueError):
    """The model's architecture or rotary scheme cannot be blended."""


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @property
    def layout(self) -> str:
        return f"l{self.num_layers}h{self.num_kv_heads}d{self.head_dim}"


class ModelAdapter:
    """Runs a decoder one layer at a time over a chosen set of tokens.

    KV buffers are ``[layers, 2, kv_heads, N, head_dim]`` in the model dtype; ``N`` is the length of the
    whole sequence; a token's index in the buffer is its rotary position.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        config = model.config.get_text_config(decoder=True)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        rope_params = getattr(config, "rope_parameters", None) or {}
        self.rope_type: str = rope_params.get("rope_type", "default")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(f"rope type {self.rope_type!r} is not supported")
        self.model = model
        self.config = config
        self.model_type: str = model_type
        backbone = model.model
        self.embed_tokens = backbone.embed_tokens
        self.layers = list(backbone.layers)
        self.norm = backbone.norm
        self.lm_head = model.lm_head
        self.rotary = backbone.rotary_emb
        attn = self.layers[0].self_attn
        head_dim = attn.head_dim
        self.shape = ModelShape(
            num_layers=len(self.layers),
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        )
        self.scaling: float = float(attn.scaling)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * len(self.layers)
        window = getattr(config, "sliding_window", None)
        if model_type == "mistral":
            layer_types = ["sliding_attention" if window else "full_attention"] * len(self.layers)
        self.windows: list[int | None] = [window if t == "sliding_attention" else None for t in layer_types]
        # Dynamic NTK changes the frequencies past the trained length: cached keys stay valid only below it.
        self.max_reuse_positions: int | None = (
            getattr(self.rotary, "original_max_seq_len", None) if self.rope_type == "dynamic" else None
        )

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """The rotary inverse frequencies of positions below the trained length (after the model's rope
        scaling), float32. Dynamic NTK rescales ``rotary.inv_freq`` in place during a long forward pass and
        resets it only on the next short one, so re-rotation reads the frozen original instead: it must not
        depend on what earlier requests ran."""
        original = getattr(self.rotary, "original_inv_freq", None)
        if self.rope_type == "dynamic" and original is not None:
            return original.to(torch.float32)
        return self.rotary.inv_freq.to(torch.float32)

    def empty_kv(self, num_tokens: int) -> torch.Tensor:
        s = self.shape
        return torch.zeros(
            (s.num_layers, 2, s.num_kv_heads, num_tokens, s.head_dim), dtype=self.dtype, device=self.device
        )

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """``[n]`` ids -> ``[n, hidden]``."""
        return self.embed_tokens(token_ids.to(self.device))

    def project_qkv(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Post-RoPE q ``[heads, n, d]``, k and v ``[kv_heads, n, d]`` for ``hidden`` ``[n, hidden]``."""
        s = self.shape
        block = self.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(hidden)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, s.num_heads, s.head_dim)
        k = attn.k_proj(x).view(n, s.num_kv_heads, s.head_dim)
        v = attn.v_proj(x).view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        if self.model_type == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        cos, sin = self.rotary(x, positions.to(self.device)[None, :])
        cos, sin = cos[0], sin[0]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend_and_mlp(
        self,
        layer: int,
        hidden: torch.Tensor,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of ``q`` over ``keys``/``values`` ``[kv_heads, N, d]`` with boolean ``mask`` ``[n, N]``
        (True = may attend), then the residual MLP. Returns the layer's output hidden ``[n, hidden]``."""
        block = self.layers[layer]
        out = F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask[None, None], scale=self.scaling, enable_gqa=True
        )
        out = out[0].transpose(0, 1).reshape(q.shape[1], -1)
        hidden = hidden + block.self_attn.o_proj(out)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def causal_mask(self, layer: int, query_index: torch.Tensor, num_keys: int) -> torch.Tensor:
        """Exact per-token causal mask: query at buffer index i sees key j iff j <= i (and inside the
        layer's sliding window, if any). ``query_index``: ``[n]`` buffer indices of the queries."""
        keys = torch.arange(num_keys, device=self.device)[None, :]
        rows = query_index.to(self.device)[:, None]
        mask = keys <= rows
        window = self.windows[layer]
        if window is not None:
            mask &= keys > rows - window
        return mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: ``[n, hidden]`` -> float32 ``[n, vocab]``."""
        return self.lm_head(self.norm(hidden)).float()

    @torch.inference_mode()
    def prefill(
        self, token_ids: torch.Tensor, past_kv: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense prefill of ``token_ids`` ``[n]`` after ``past_kv`` (``[L, 2, H, P, d]`` at positions 0..P-1).

        Returns (KV of all P + n tokens, float32 logits ``[n, vocab]`` of the new tokens).
        """
        kv, past = self._buffer(token_ids, past_kv)
        return kv, self.logits(self._run_layers(kv, past, token_ids))

    @torch.inference_mode()
    def prefill_kv(self, token_ids: torch.Tensor, past_kv: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`prefill`'s KV alone, without the LM head (chunks computed to be stored)."""
        kv, past = self._buffer(token_ids, past_kv)
        self._run_layers(kv, past, token_ids)
        return kv

    @torch.inference_mode()
    def prefill_into(self, kv: torch.Tensor, start: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Dense prefill of ``token_ids`` at positions ``start..`` of the pre-allocated buffer ``kv`` (the
        tokens before ``start`` already in it), writing their KV in place; float32 logits ``[vocab]`` of
        the last token only: the LM head over every prompt token would cost a fifth of the prefill."""
        end = start + token_ids.shape[0]
        hidden = self._run_layers(kv[:, :, :, :end], start, token_ids)
        return self.logits(hidden[-1:])[0]

    def _buffer(self, token_ids: torch.Tensor, past_kv: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """A KV buffer for ``past_kv`` followed by ``token_ids``, the past copied in, and the past's length."""
        past = 0 if past_kv is None else past_kv.shape[3]
        kv = self.empty_kv(past + token_ids.shape[0])
        if past_kv is not None:
            kv[:, :, :, :past] = past_kv
        return kv, past

    def _run_layers(self, kv: torch.Tensor, past: int, token_ids: torch.Tensor) -> torch.Tensor:
        """Every layer over ``token_ids`` at positions ``past..`` of ``kv`` (their KV written in place)."""
        index = torch.arange(past, past + token_ids.shape[0], device=self.device)
        hidden = self.embed(token_ids)
        for layer in range(self.shape.num_layers):
            q, k, v = self.project_qkv(layer, hidden, index)
            kv[layer, 0, :, past:] = k
            kv[layer, 1, :, past:] = v
            mask = self.causal_mask(layer, index, kv.shape[3])
            hidden = self.attend_and_mlp(layer, hidden, q, kv[layer, 0], kv[layer, 1], mask)
        return hidden
