"""3-D rotary position embedding (Wan2.1) with ShotStream's shot-phase indicator.

Each head of `head_dim` channels is read as head_dim/2 complex pairs of adjacent channels, split into a
temporal, a height and a width group (for head_dim 128: 22 / 21 / 21 pairs). The indicator adds a constant
phase `flag * shot_phase` radians to every temporal angle, so frames of different shots are told apart even
though their temporal positions are contiguous.
"""
from __future__ import annotations

import torch


def rope_pair_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w); Wan gives height and width 2*(d//6) real channels each."""
    hw = 2 * (head_dim // 6)
    t = head_dim - 2 * hw
    return t // 2, hw // 2, hw // 2


def axis_frequencies(pairs: int, theta: float) -> torch.Tensor:
    """omega_j = theta^(-2j / (2*pairs)), j < pairs, in float64."""
    return theta ** (-torch.arange(pairs, dtype=torch.float64) * 2 / (2 * pairs))


def rope_angles(
    head_dim: int,
    frame_positions: torch.Tensor,  # [F] temporal position of each latent frame
    frame_flags: torch.Tensor,  # [F] shot flag of each latent frame
    grid_h: int,
    grid_w: int,
    theta: float = 10000.0,
    shot_phase: float = 1.0 / 6.0,
) -> torch.Tensor:
    """Angles [F*grid_h*grid_w, head_dim/2] in float64, tokens ordered frame-major then row then column."""
    pt, ph, pw = rope_pair_split(head_dim)
    num_frames = frame_positions.shape[0]
    pos = frame_positions.to(torch.float64).cpu()
    flags = frame_flags.to(torch.float64).cpu()
    ang_t = pos[:, None] * axis_frequencies(pt, theta)[None] + flags[:, None] * shot_phase  # [F, pt]
    ang_h = torch.arange(grid_h, dtype=torch.float64)[:, None] * axis_frequencies(ph, theta)[None]  # [h, ph]
    ang_w = torch.arange(grid_w, dtype=torch.float64)[:, None] * axis_frequencies(pw, theta)[None]  # [w, pw]
    angles = torch.cat(
        [
            ang_t[:, None, None, :].expand(num_frames, grid_h, grid_w, pt),
            ang_h[None, :, None, :].expand(num_frames, grid_h, grid_w, ph),
            ang_w[None, None, :, :].expand(num_frames, grid_h, grid_w, pw),
        ],
        dim=-1,
    )
    return angles.reshape(num_frames * grid_h * grid_w, pt + ph + pw)


class RotaryTable:
    """cos/sin of the angles, ready to apply to [B, L, H, D] tensors."""

    def __init__(self, angles: torch.Tensor, device, dtype=torch.float32):
        """angles [L, Dh/2] or [B, L, Dh/2] (per-sample shot flags)."""
        if angles.dim() == 2:
            angles = angles[None]
        self.cos = angles.cos().to(device=device, dtype=dtype)[:, :, None, :]  # [B|1, L, 1, Dh/2]
        self.sin = angles.sin().to(device=device, dtype=dtype)[:, :, None, :]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent channel pairs of x [B, L, H, D]; computed in float32, returned in x's dtype."""
        xf = x.float().unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
        real, imag = xf[..., 0], xf[..., 1]
        out = torch.stack((real * self.cos - imag * self.sin, real * self.sin + imag * self.cos), dim=-1)
        return out.flatten(-2).to(x.dtype)
