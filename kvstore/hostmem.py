"""Host buffers for KV payloads: pinned where CUDA exists, else huge-page backed.

A fresh multi-megabyte ``torch.empty`` on the CPU is first touched page by page (4 KiB faults), which caps
copies into it at a fraction of memory bandwidth. numpy asks the kernel for transparent huge pages on
large allocations (``madvise(MADV_HUGEPAGE)``), so buffers come from numpy and are wrapped without a copy.
"""

from __future__ import annotations

import numpy as np
import torch


def cuda_available() -> bool:
    """Whether a CUDA device can be used (never raises)."""
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - broken driver installs
        return False


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

    Host-to-host copies of contiguous tensors use one ``memcpy`` (numpy, GIL released) instead of torch's
    OpenMP-parallel copy: on a busy host, waking the OpenMP team costs milliseconds per call, while callers
    already copy from many threads at once.
    """
    t = t.detach()
    out = empty_like_host(t, pin)
    if t.device.type == "cpu" and t.is_contiguous() and t.numel():
        np.copyto(out.view(torch.uint8).reshape(-1).numpy(), t.view(torch.uint8).reshape(-1).numpy())
    else:
        out.copy_(t, non_blocking=False)
    return out
