"""Adversarial loss for the VAE's decoder: a per-frame patch discriminator, as Wan's VAE is trained with.

L1/L2 alone make a decoder return the mean of what a latent could mean: a blur. On the Story World that
blur is what the analyser cannot read (a character's edge smeared past its palette colour), so a decoder
that draws a sharp plausible edge scores better even where it is not the exact one. The discriminator
judges 2-D frames in patches (PatchGAN, pix2pix/taming); the generator's adversarial term is scaled
against the reconstruction term by their gradient norms at the decoder's last layer (taming's adaptive
weight), so `adv_weight` means the same whatever the loss scales are.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """frames [N, 3, H, W] in [-1, 1] -> logits [N, 1, H/8, W/8], one per overlapping patch."""

    def __init__(self, width: int = 32, layers: int = 3):
        super().__init__()
        blocks, c = [], 3
        for i in range(layers):  # each halves the size
            out = width * 2**i
            blocks += [nn.Conv2d(c, out, 4, stride=2, padding=1),
                       nn.GroupNorm(8, out) if i else nn.Identity(), nn.LeakyReLU(0.2)]
            c = out
        blocks.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] -> logits [B*T, 1, H/8, W/8] (frames judged one by one)."""
        frames = video.transpose(1, 2).flatten(0, 1)
        return self.net(frames)


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss: real logits pushed above 1, fake ones below -1."""
    return F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean()


def generator_loss(disc: nn.Module, fake: torch.Tensor) -> torch.Tensor:
    return -disc(fake).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_weight: torch.Tensor,
                    cap: float = 1e4) -> torch.Tensor:
    """|d rec / d w| / |d adv / d w| at the decoder's last layer w: the weight at which the adversarial term
    pulls that layer as hard as reconstruction does (detached; capped where adv's gradient vanishes)."""
    g_rec = torch.autograd.grad(rec_loss, last_weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_weight, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(max=cap).detach()
