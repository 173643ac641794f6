"""Where a frame's small things are, and loss weights that favour them.

A Story World character is about 5% of a 64x64 frame: under a plain L1/L2 loss it is almost all
background, so a small model learns the sky and the ground and blurs or drops the characters. Detail is
how far a pixel is from its neighbourhood's mean colour (edges, small objects); a flat background has
none. The VAE stage weighs its pixels by it; pre-encoding pools it to the latent grid so that the teacher
can weigh its latent cells the same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def detail_map(clips: torch.Tensor, radius: int) -> torch.Tensor:
    """clips [B, 3, T, H, W] -> [B, 1, T, H, W] >= 0: how far each pixel is from its neighbourhood's mean
    colour (L1 over channels), spread over the neighbourhood so a shape's inside and rim both count."""
    k = 2 * radius + 1
    local_mean = nn.functional.avg_pool3d(clips, (1, k, k), stride=1, padding=(0, radius, radius),
                                          count_include_pad=False)
    detail = (clips - local_mean).abs().sum(dim=1, keepdim=True)
    return nn.functional.max_pool3d(detail, (1, k, k), stride=1, padding=(0, radius, radius))


def detail_weights(detail: torch.Tensor, detail_weight: float) -> torch.Tensor:
    """Loss weights from a detail map [..., H, W]: 1 + detail_weight * detail / the frame's mean detail, so
    each frame's weights average 1 + detail_weight (a flat frame keeps weights of about 1)."""
    frame_mean = detail.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return 1.0 + detail_weight * detail / frame_mean


def detail_pixel_weights(clips: torch.Tensor, detail_weight: float, radius: int) -> torch.Tensor | None:
    """Per-pixel loss weights [B, 1, T, H, W] with mean 1 + detail_weight per frame; None when off."""
    if detail_weight <= 0:
        return None
    return detail_weights(detail_map(clips, radius), detail_weight)


def latent_detail_map(video: torch.Tensor, temporal_stride: int, spatial_stride: int, radius: int) -> torch.Tensor:
    """video [B, 3, T, H, W] in [-1, 1], T = 1 + temporal_stride * n -> [B, 1 + n, H / s, W / s]: the pixel
    detail of the frames each latent cell encodes (the first frame alone, then groups of temporal_stride,
    as the causal VAE encodes them), max over those frames and averaged over the cell's s x s pixels."""
    t, h, w = video.shape[2:]
    if (t - 1) % temporal_stride or h % spatial_stride or w % spatial_stride:
        raise ValueError(f"video of {t} frames of {h}x{w} does not map onto a {temporal_stride}x{spatial_stride}"
                         f"x{spatial_stride} latent grid (frames must be 1 + {temporal_stride}k)")
    d = detail_map(video, radius)[:, 0]  # [B, T, H, W]
    groups = [d[:, :1]] + [d[:, i:i + temporal_stride] for i in range(1, t, temporal_stride)]
    per_latent_frame = torch.stack([g.amax(dim=1) for g in groups], dim=1)  # [B, F, H, W]
    return nn.functional.avg_pool2d(per_latent_frame, spatial_stride)  # [B, F, h, w]
