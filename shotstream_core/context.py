"""History handling: which frames of earlier shots form the global context, and the shot flags.

Rule of the reference: a budget of `total` latent frames over n earlier shots; each gets total // n, the
last total % n shots one more (so with n > total the oldest shots get none). Within a shot the frames are
round(linspace(first, last, count)) over its pixel frames. Each chosen frame is encoded alone, and its latent
kept for later shots (ContextLatentCache).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .recent import RecentlyUsed


def context_budget(num_prev_shots: int, total: int = 6) -> list[int]:
    """Frames taken from each earlier shot, oldest first."""
    if num_prev_shots <= 0:
        return []
    counts = [total // num_prev_shots] * num_prev_shots
    for i in range(1, total % num_prev_shots + 1):
        counts[-i] += 1
    return counts


def select_frame_indices(first: int, last: int, count: int) -> list[int]:
    """round(linspace(first, last, count)) with torch's rounding (half to even), endpoints kept."""
    if count <= 0:
        return []
    return torch.linspace(first, last, steps=count).round().long().tolist()


@dataclass(frozen=True)
class ContextPlan:
    """Which (shot, pixel frame) pairs feed the global cache, their flags, and the new shot's flag."""

    picks: tuple[tuple[int, int], ...]  # (shot index, frame index within the shot)
    flags: tuple[int, ...]  # one per context latent frame
    shot_flag: int  # flag of the shot being generated
    zero_context: bool  # first shot: all-zero latents


def plan_context(frames_per_prev_shot: list[int], total: int = 6) -> ContextPlan:
    """frames_per_prev_shot: pixel frame count of each earlier shot (empty for the first shot)."""
    n = len(frames_per_prev_shot)
    if n == 0:
        return ContextPlan((), (0,) * total, 1, True)
    picks, flags = [], []
    for shot, (count, length) in enumerate(zip(context_budget(n, total), frames_per_prev_shot)):
        for idx in select_frame_indices(0, length - 1, count):
            picks.append((shot, idx))
            flags.append(shot)
    return ContextPlan(tuple(picks), tuple(flags), flags[-1] + 1, False)


def encode_frame_alone(vae, frame: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] (any device) -> latent [C, h, w] on the VAE's device: the frame as a one-frame clip,
    encoded on its own (a batch of frames rounds differently, about 2e-7), as the engine and stage 4 need."""
    weight = next(vae.parameters())
    pixels = frame.permute(2, 0, 1)[None].to(weight.device, torch.float32) / 127.5 - 1  # [1, 3, H, W] in [-1, 1]
    return vae.encode_frames(pixels.to(weight.dtype))[0]


class ContextLatentCache(RecentlyUsed):
    """Latents of history frames, each encoded alone, kept for the `capacity` most recently used frames.

    Later shots reuse most of the frames earlier shots picked (from the seventh shot on, five of the six), so
    only the new ones meet the VAE. Keys are the frames' bytes, so a forked, rolled-back or reloaded story
    finds its frames too. Every miss is encoded on its own, never batched with other misses: a frame's latent
    is then the same whichever frames happened to be cached, and a story comes out bit for bit the same
    with a cold cache or a warm one.
    """

    def __init__(self, encode_frame: Callable[[torch.Tensor], torch.Tensor], capacity: int):
        super().__init__(capacity)
        self.encode_frame = encode_frame  # uint8 [H, W, 3] -> latent [C, h, w]
        self.encoded = 0  # frames actually sent to the VAE

    @staticmethod
    def key(frame: torch.Tensor) -> bytes:
        digest = hashlib.blake2b(frame.contiguous().numpy(), digest_size=16)
        digest.update(repr(tuple(frame.shape)).encode())
        return digest.digest()

    def get_many(self, frames: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Latents [C, h, w] of uint8 frames [H, W, 3] (CPU), in order."""
        keys = [self.key(f) for f in frames]
        for k, frame in zip(keys, frames):
            if k not in self:
                self._values[k] = self.encode_frame(frame)
                self.encoded += 1
        return self._take(keys)
