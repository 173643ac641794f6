"""Attention dispatch: flash-attn 3 / 2 on CUDA when importable, torch SDPA otherwise.

All entry points take and return [B, L, H, D] (the flash-attn layout). Masks are only supported by SDPA;
streaming inference needs none, training with a block-causal mask always goes through SDPA.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flash_attn_2", "flash_attn_3")


def _import_flash(backend: str):
    module = {"flash_attn_3": "flash_attn_interface", "flash_attn_2": "flash_attn"}[backend]
    try:
        return importlib.import_module(module).flash_attn_func
    except ImportError:
        return None


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Pick a concrete backend; a requested one that is unavailable is an error, not a silent fallback."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        if on_cuda:
            for candidate in ("flash_attn_3", "flash_attn_2"):
                if _import_flash(candidate) is not None:
                    return candidate
        return "sdpa"
    if requested != "sdpa":
        if not on_cuda:
            raise ValueError(f"attention backend {requested} needs a CUDA device; use 'sdpa' or 'auto' on {device}")
        if _import_flash(requested) is None:
            pkg = "flash-attn (pip install flash-attn)" if requested == "flash_attn_2" else "flash-attn 3 (hopper build)"
            raise ValueError(f"attention backend {requested} is not installed: install {pkg}, or choose 'sdpa'/'auto'")
    return requested


def attention(q, k, v, backend: str = "sdpa", mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]. mask: bool [Lq, Lk], True = may attend."""
    if backend != "sdpa" and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out = _import_flash(backend)(q, k, v)
        return out[0] if isinstance(out, tuple) else out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
