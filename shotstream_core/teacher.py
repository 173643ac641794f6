"""Sampling the bidirectional next-shot teacher: Euler over the shifted flow schedule with CFG, and optional
history guidance (the flow pushed away from the same shot sampled without its history).

Used for ODE-pair generation (stage 2 of training) and as the teacher row of the evaluation. The teacher
sees [clean context | noisy shot] with full attention and one timestep per sample; the context frames get
the same t as the shot, as in the reference.
"""
from __future__ import annotations

import torch

from .model import WanDiT


def teacher_sigmas(steps: int, shift: float) -> torch.Tensor:
    """steps+1 sigmas from 1 to 0 on the shifted grid (Wan's flow-matching sampler)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


def without_history(context, text, flags, prompt_ids):
    """The same shots as first shots, as context dropout trains them: zero context with flags 0, the shot's
    flag 1, and each shot's own prompt alone (the one its frames read). context [B, C, Fc, h, w]; text
    [B, P, S, d]; flags / prompt_ids [B, Fc+F] -> the four in that layout (text [B, 1, S, d]). A first shot
    comes back as it was."""
    fc = context.shape[2]
    own = prompt_ids[:, fc]  # [B]
    alone_text = text[torch.arange(text.shape[0], device=own.device), own][:, None]
    alone_flags = torch.ones_like(flags)
    alone_flags[:, :fc] = 0
    return torch.zeros_like(context), alone_text, alone_flags, torch.zeros_like(prompt_ids)


@torch.no_grad()
def sample_teacher(teacher: WanDiT, context, noise, text, flags, prompt_ids=None, uncond_text=None,
                   steps: int = 50, guidance: float = 6.0, shift: float = 8.0, save_at=(), num_train_timesteps=1000,
                   shot_phase: float = 1.0 / 6.0, history_guidance: float = 1.0):
    """context [B, C, Fc, h, w] clean; noise [B, C, F, h, w]; text/uncond_text [B, P, S, text_dim];
    flags / prompt_ids [B, Fc+F]. Returns (x0 [B, C, F, h, w], {t: x_t} for every t in save_at that lies
    on the grid, matched to the nearest grid step).
    History guidance (history_guidance h != 1): v = CFG(v) + (h - 1) (v_cond - v_alone), where v_alone is the
    conditional flow of the same shots without their history (without_history)."""
    sigmas = teacher_sigmas(steps, shift)
    grid_t = sigmas[:-1] * num_train_timesteps
    wanted = {int((grid_t - t).abs().argmin()): t for t in save_at}
    text_kv = teacher.encode_text(text)
    uncond_kv = teacher.encode_text(uncond_text) if (uncond_text is not None and guidance != 1.0) else None
    alone = without_history(context, text, flags, prompt_ids) if history_guidance != 1.0 else None
    alone_kv = teacher.encode_text(alone[1]) if alone is not None else None
    fc = context.shape[2]
    x = noise.float()
    saved = {}
    for i in range(steps):
        if i in wanted:
            saved[wanted[i]] = x.clone()
        t = torch.full((x.shape[0],), float(grid_t[i]), device=x.device)
        seq = torch.cat([context.float(), x], 2)
        v_c = teacher(seq, t, None, flags, prompt_ids, text_kv=text_kv, shot_phase=shot_phase)[:, :, fc:]
        v = v_c
        if uncond_kv is not None:
            v_u = teacher(seq, t, None, flags, prompt_ids, text_kv=uncond_kv, shot_phase=shot_phase)[:, :, fc:]
            v = v_u + guidance * (v_c - v_u)
        if alone_kv is not None:
            seq_alone = torch.cat([alone[0].float(), x], 2)
            v_a = teacher(seq_alone, t, None, alone[2], alone[3], text_kv=alone_kv, shot_phase=shot_phase)[:, :, fc:]
            v = v + (history_guidance - 1.0) * (v_c - v_a)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x, saved
