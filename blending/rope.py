"""Re-rotating cached keys from the positions they were computed at to new positions."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rerotate(
    keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor, inv_freq: torch.Tensor
) -> torch.Tensor:
    """Move post-RoPE keys from ``old_positions`` to ``new_positions``.

    ``keys``: ``[..., T, head_dim]`` (any leading dims, e.g. layers and heads); positions: ``[T]``;
    ``inv_freq``: ``[head_dim // 2]``, the model's own (scaled) inverse frequencies. RoPE rotations
    compose, so one rotation by the integer delta suffices; it runs in float32 and returns the keys'
    dtype. Attention scaling factors (YaRN) were applied at compute time and are preserved.
    """
    if old_positions.shape != new_positions.shape or old_positions.shape[0] != keys.shape[-2]:
        raise ValueError(
            f"positions {tuple(old_positions.shape)} -> {tuple(new_positions.shape)} "
            f"do not match keys {tuple(keys.shape)}"
        )
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(keys.device)
    if not bool(delta.any()):
        return keys
    freqs = delta.to(torch.float32)[:, None] * inv_freq.to(device=keys.device, dtype=torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    k32 = keys.to(torch.float32)
    out = k32 * emb.cos() + rotate_half(k32) * emb.sin()
    return out.to(keys.dtype)
