"""Distribution matching distillation (DMD): the generator loss from a real and a fake score, the critic
loss that keeps the fake score on the generator's distribution, and one generator / critic update.

Both scores are bidirectional next-shot DiTs (teacher architecture, one t per sample) that see
[clean context | x_t] along frames, exactly as the teacher was trained (shotstream.md sections 6-7):
  real = frozen teacher with CFG on its x0: cond + g (cond - uncond), uncond = negative-prompt features;
         with history guidance h != 1 also + (h - 1) (cond - cond without history), the shot taken as a first
         shot (off in the recipe: h = 1);
  fake = trainable copy of the teacher, no guidance.
  grad = (x0_fake - x0_real) / mean|x - x0_real|   (per sample)
  L_G  = 0.5 * mse(x, stopgrad(x - grad))           (so dL_G/dx = grad / numel: x moves toward x0_real)
  L_critic = mse(fake flow on x_t of the detached sample, noise - x)
t: a uniform index over the whole shifted table, its timestep clamped to [t_min, t_max] (20..980), as the
reference's code draws it; one t per sample for all its frames.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from shotstream_core.model import WanDiT
from shotstream_core.schedule import FlowSchedule

from .common import clip_and_step
from .rollout import SelfForcingRollout, ShotConditioning


def uncond_like(text: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Negative-prompt features [L, text_dim] in the layout of text [B, P, S, text_dim]: every shot's prompt
    replaced by the negative prompt, so the same prompt ids work for both CFG branches."""
    b, p, s, d = text.shape
    if negative.dim() != 2 or negative.shape[-1] != d:
        raise ValueError(f"negative features must be [L, {d}], got {tuple(negative.shape)}")
    length = max(s, negative.shape[0])
    out = torch.zeros(b, p, length, d, device=text.device, dtype=text.dtype)
    out[:, :, : negative.shape[0]] = negative.to(text)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class DMDLoss:
    def __init__(self, schedule: FlowSchedule, guidance: float = 3.0, t_min: int = 20, t_max: int = 980,
                 shot_phase: float = 1.0 / 6.0, history_guidance: float = 1.0):
        if not 0 <= t_min <= t_max < schedule.num_train_timesteps:
            raise ValueError(f"need 0 <= t_min <= t_max < {schedule.num_train_timesteps}; got {t_min}, {t_max}")
        self.schedule, self.guidance, self.history_guidance = schedule, guidance, history_guidance
        self.t_min, self.t_max, self.shot_phase = t_min, t_max, shot_phase

    def sample_t(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] timesteps as the reference draws them: a table index uniform over the whole table, then the
        timestep's value clamped to [t_min, t_max] (so 980 takes every draw above it; at shift 8 about 14%)."""
        return self.schedule.sample_training_t((batch,), 0, None, generator).clamp(self.t_min, self.t_max)

    def score_flow(self, score: nn.Module, x_t, t, cond: ShotConditioning, text_kv) -> torch.Tensor:
        """Flow of the shot frames from a teacher-style score on [clean context | x_t] with one t per sample."""
        seq = torch.cat([cond.context.to(x_t.dtype), x_t], 2)  # [B, C, Fc+F, h, w]
        flow = score(seq, t, None, cond.flags, cond.prompt_ids, text_kv=text_kv, shot_phase=self.shot_phase)
        return flow[:, :, cond.context_frames:]

    @torch.no_grad()
    def dmd_direction(self, x, cond: ShotConditioning, uncond_text, real: nn.Module, fake: nn.Module,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """The normalised DMD gradient (x0_fake - x0_real) / mean|x - x0_real| [B, C, F, h, w], and stats."""
        b = x.shape[0]
        t = self.sample_t(b, generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x_t = self.schedule.add_noise(x, noise, t)
        x0_fake = self.schedule.x0_from_flow(x_t, self.score_flow(fake, x_t, t, cond, _unwrap(fake).encode_text(cond.text)), t)
        real_m = _unwrap(real)
        x0_cond = self.schedule.x0_from_flow(x_t, self.score_flow(real, x_t, t, cond, real_m.encode_text(cond.text)), t)
        if self.guidance != 0:
            uncond_kv = real_m.encode_text(uncond_text)
            x0_uncond = self.schedule.x0_from_flow(x_t, self.score_flow(real, x_t, t, cond, uncond_kv), t)
            x0_real = x0_cond + self.guidance * (x0_cond - x0_uncond)
        else:
            x0_real = x0_cond
        if self.history_guidance != 1.0:  # a first shot's own history-free branch is itself: no change there
            alone = cond.without_history()
            flow = self.score_flow(real, x_t, t, alone, real_m.encode_text(alone.text))
            x0_real = x0_real + (self.history_guidance - 1.0) * (x0_cond - self.schedule.x0_from_flow(x_t, flow, t))
        normaliser = (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        direction = torch.nan_to_num((x0_fake - x0_real) / normaliser)
        stats = {"dmd_t": float(t.mean()), "dmd_gap": float((x0_fake - x0_real).abs().mean()),
                 "dmd_norm": float(normaliser.mean())}
        return direction, stats

    def generator_loss(self, x, cond, uncond_text, real, fake, generator=None) -> tuple[torch.Tensor, dict]:
        direction, stats = self.dmd_direction(x.detach(), cond, uncond_text, real, fake, generator)
        target = (x.double() - direction.double()).detach()
        loss = 0.5 * F.mse_loss(x.double(), target)
        return loss.float(), stats

    def critic_loss(self, x, cond: ShotConditioning, fake: nn.Module, generator=None) -> torch.Tensor:
        """Flow-matching loss of the fake score on the generator's (detached) samples x [B, C, F, h, w]."""
        x = x.detach()
        t = self.sample_t(x.shape[0], generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x_t = self.schedule.add_noise(x, noise, t)
        flow = self.score_flow(fake, x_t, t, cond, _unwrap(fake).encode_text(cond.text))
        return F.mse_loss(flow.float(), self.schedule.flow_target(x, noise).float())


# --- one update ---------------------------------------------------------------------------------------

@dataclass
class DMDHyper:
    lr_generator: float = 2e-5
    lr_critic: float = 4e-6
    betas: tuple[float, float] = (0.0, 0.999)
    weight_decay: float = 0.01
    guidance: float = 3.0
    history_guidance: float = 1.0  # the real score pushed towards its history by h - 1 (1: off)
    t_min: int = 20
    t_max: int = 980
    critic_per_generator: int = 5  # critic updates per generator update (the reference's 1:5)
    clip_steps: int = 1  # optimiser steps per clip (stage 4: shots per clip; see is_generator_step)
    grad_clip_generator: float = 1.0
    grad_clip_critic: float = 10.0


def make_optimizer(params, lr: float, hyper: DMDHyper) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: nothing for the optimiser to update")
    return torch.optim.AdamW(params, lr=lr, betas=tuple(hyper.betas), weight_decay=hyper.weight_decay)


def is_generator_step(step: int, critic_per_generator: int, clip_steps: int = 1) -> bool:
    """Cycle of 1 + n optimiser steps: the generator first, then n critic steps.

    Where steps come in clips of `clip_steps` (stage 4: one step a shot, shots in story order), a fixed cycle
    would pin the generator to a few shot indices (4-shot clips: shots 0 and 2 only; 2, 3 or 6: shot 0, with no
    history at all). So the cycle slips by one step every lcm(clip_steps, cycle) steps: the generator's updates
    then fall on every shot index equally often, and the ratio stays exactly 1:n.
    """
    cycle = critic_per_generator + 1
    slip = step // math.lcm(clip_steps, cycle) if clip_steps > 1 else 0
    return (step + slip) % cycle == 0


def sync_gradients(module: nn.Module, dist) -> None:
    """Average gradients over ranks by hand. The generator's rollout calls forward_cached several times
    per backward, which DDP's reducer does not allow, so its grads are reduced here instead."""
    if dist is None or getattr(dist, "world_size", 1) <= 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(dist.all_mean(p.grad))


class DMDTrainer:
    """Holds the generator (causal student), the frozen real score, the trainable fake score, their
    optimisers, the rollout and the loss; `step` does one generator or critic update."""

    def __init__(self, student: nn.Module, real: WanDiT, fake: nn.Module, rollout: SelfForcingRollout,
                 hyper: DMDHyper, dist=None, autocast=contextlib.nullcontext):
        self.student, self.real, self.fake = student, real, fake  # student/fake may be DDP-wrapped
        self.rollout, self.hyper, self.dist = rollout, hyper, dist
        self.autocast = autocast  # context factory for the forward passes (bf16 on GPU); backward runs outside
        self.real.requires_grad_(False).eval()
        self.loss = DMDLoss(rollout.schedule, hyper.guidance, hyper.t_min, hyper.t_max,
                            rollout.sampler.rope_shot_phase, hyper.history_guidance)
        self.opt_g = make_optimizer(_unwrap(student).parameters(), hyper.lr_generator, hyper)
        self.opt_c = make_optimizer(_unwrap(fake).parameters(), hyper.lr_critic, hyper)

    def generate(self, cond: ShotConditioning, noise, generator, grad: bool) -> tuple[torch.Tensor, int]:
        """The student's rollout and its exit step. Every rank draws one (keeping the generators in step)
        and uses rank 0's: the averaged gradients must all come from the same denoising step."""
        exit_step = self.rollout.sample_exit_step(generator)
        if self.dist is not None:
            exit_step = self.dist.from_main(exit_step)
        return self.rollout(_unwrap(self.student), cond, noise, exit_step, generator, grad=grad), exit_step

    def step(self, step: int, cond: ShotConditioning, uncond_text, noise, generator) -> tuple[dict, torch.Tensor]:
        """One optimiser step; returns (scalars to log, the generated shot [B, C, F, h, w], detached)."""
        if is_generator_step(step, self.hyper.critic_per_generator, self.hyper.clip_steps):
            self.opt_g.zero_grad(set_to_none=True)
            with self.autocast():
                x, exit_step = self.generate(cond, noise, generator, grad=True)
                loss, stats = self.loss.generator_loss(x, cond, uncond_text, self.real, self.fake, generator)
            loss.backward()
            sync_gradients(_unwrap(self.student), self.dist)
            norm = clip_and_step(self.opt_g, _unwrap(self.student).parameters(), self.hyper.grad_clip_generator)
            return {"generator_loss": loss.item(), "generator_grad_norm": float(norm), "exit_step": exit_step,
                    **stats}, x.detach().float()
        self.opt_c.zero_grad(set_to_none=True)
        with self.autocast():
            with torch.no_grad():
                x, exit_step = self.generate(cond, noise, generator, grad=False)
                x = x.float()
            loss = self.loss.critic_loss(x, cond, self.fake, generator)
        loss.backward()
        norm = clip_and_step(self.opt_c, _unwrap(self.fake).parameters(), self.hyper.grad_clip_critic)
        return {"critic_loss": loss.item(), "critic_grad_norm": float(norm), "exit_step": exit_step}, x
