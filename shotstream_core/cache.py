"""Preallocated per-layer K/V cache for streaming: [global context frames | current shot frames].

The buffer is allocated once for the largest sequence (context + one shot) and written in place; a new
shot only rewinds, it never reallocates or clones. Slots are addressed by token index, so a block's
denoising passes overwrite its own slots and its cache-refresh pass leaves the clean K/V there.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_tokens: int, num_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu"):
        shape = (batch, max_tokens, num_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_tokens = max_tokens

    @classmethod
    def for_model(cls, model, batch: int, frames: int, tokens_per_frame: int, dtype=None, device=None):
        cfg = model.config
        p = model.patch_embedding.weight
        return cls(cfg.num_layers, batch, frames * tokens_per_frame, cfg.num_heads, cfg.head_dim,
                   dtype or p.dtype, device or p.device)

    def write_and_read(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, L, H, D] at tokens [start, start+L) and return every token up to there.

        Under autograd (training rollouts) the cache holds detached copies and the fresh k/v stay in the
        graph through a concatenation, so later in-place writes cannot corrupt a saved tensor.
        """
        end = start + k.shape[1]
        if end > self.max_tokens:
            raise ValueError(f"K/V cache holds {self.max_tokens} tokens; a write up to {end} does not fit")
        kc, vc = self.keys[layer], self.values[layer]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            kc[:, start:end] = k.detach()
            vc[:, start:end] = v.detach()
            return torch.cat([kc[:, :start], k], 1), torch.cat([vc[:, :start], v], 1)
        kc[:, start:end] = k
        vc[:, start:end] = v
        return kc[:, :end], vc[:, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
