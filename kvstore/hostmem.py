"""Host buffers for KV payloads: pinned where CUDA exists, else huge-page backed.

A fresh multi-megabyte ``torch.empty`` on the CPU is first touched page by page (4 KiB faults), which caps
copies into it at a fraction of memory bandwidth. numpy asks the kernel for transparent huge pages on
large allocations (``madvise(MADV_HUGEPAGE)``), so buffers come from numpy and are wrapped without a copy.
"""

from __future__ import annotations

import numpy as np
import torch

from kvstore.parallel import share_work

_COPY_PIECE = 1 << 20
_SHARED_COPY_BYTES = 2 << 20


def cuda_available() -> bool:
    """Whether a CUDA device can be used (never raises)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver installs
        return False


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[:] = src`` for flat ``uint8`` arrays of one size. From 2 MiB on, in 1 MiB pieces that this
    thread and a helper copy together (:func:`~kvstore.parallel.share_work`: a helper that does not get a
    core in time is not waited for, unlike torch's OpenMP team, whose barrier made a 5.9 MB copy take 8 ms on
    a busy host). Measured on 2 idle cores: 5.9 MB 1.2-1.3x and 33.6 MB 1.5-1.9x the speed of one memcpy."""
    n = src.nbytes
    if dst.nbytes != n:
        raise ValueError(f"copy_bytes: destination has {dst.nbytes} bytes, source {n}")
    if n < _SHARED_COPY_BYTES:
        np.copyto(dst, src)
        return
    piece = _COPY_PIECE
    share_work(-(-n // piece), lambda i: np.copyto(dst[i * piece : (i + 1) * piece], src[i * piece : (i + 1) * piece]))


def empty_host(nbytes: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised contiguous uint8 CPU tensor of ``nbytes`` (page-locked when ``pin``)."""
    if pin:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8))


def empty_like_host(t: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor with ``t``'s shape and dtype."""
    if t.numel() == 0:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
    return empty_host(t.numel() * t.element_size(), pin).view(t.dtype).view(t.shape)


def clone_to_host(t: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """A private contiguous CPU copy of ``t`` (from any device).

    Host-to-host copies of contiguous tensors use :func:`copy_bytes` instead of torch's OpenMP-parallel
    copy: on a busy host, waking the OpenMP team costs milliseconds per call.
    """
    t = t.detach()
    out = empty_like_host(t, pin)
    if t.device.type == "cpu" and t.is_contiguous() and t.numel():
        copy_bytes(out.view(torch.uint8).reshape(-1).numpy(), t.view(torch.uint8).reshape(-1).numpy())
    else:
        out.copy_(t, non_blocking=False)
    return out
