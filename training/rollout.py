"""Self-forcing rollout: the causal student generates a whole shot block by block, as at inference.

The math is the engine's streaming loop (shotstream_core/engine.py): one t=0 pass over the context latents
fills the global cache; each block runs the warped few-step list against [global | local] K/V, re-noising
its x0 estimate with fresh noise between steps; a t=0 "cache refresh" pass on the block's clean output
leaves the K/V later blocks attend to (every block but the last, which nothing attends to).

Training differences (Self-Forcing, shotstream.md section 7):
  * one exit step per rollout, uniform among the few-step times and shared by every block: the block's
    output is the x0 estimate of that step; only that pass runs with autograd, every other pass without;
  * the cache refresh sees x0 plus a tiny noise (the table's sigma nearest t = 0: 0.0079 at shift 8, 0.001 at
    shift 1) while being told t = 0, without grad.
With exit step = the last step and refresh_sigma = 0 the rollout is exactly the engine's sampler.

Shapes: B batch, C latent channels, Fc context frames, F shot frames, h x w latent grid,
P prompts, S text tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shotstream_core.cache import KVCache
from shotstream_core.config import SamplerConfig
from shotstream_core.model import CausalWanDiT
from shotstream_core.schedule import FlowSchedule
from shotstream_core.teacher import without_history

from .data import frame_flags, pad_prompts, prompt_ids_for


@dataclass
class ShotConditioning:
    """What a shot is generated from: its history, its prompts, and every frame's flag / prompt index."""

    context: torch.Tensor  # [B, C, Fc, h, w] clean history latents (zeros for a first shot)
    text: torch.Tensor  # [B, P, S, text_dim] prompt of every shot so far (P = 1 for a first shot)
    flags: torch.Tensor  # [B, Fc+F] long: shot flag of each context frame, then the shot's flag
    prompt_ids: torch.Tensor  # [B, Fc+F] long: which of the P prompts each frame cross-attends to

    @property
    def context_frames(self) -> int:
        return self.context.shape[2]

    def to(self, device) -> "ShotConditioning":
        return ShotConditioning(self.context.to(device), self.text.to(device), self.flags.to(device),
                                self.prompt_ids.to(device))

    def without_history(self) -> "ShotConditioning":
        """The same shots as first shots, each with its own prompt alone (shotstream_core.teacher)."""
        return ShotConditioning(*without_history(self.context, self.text, self.flags, self.prompt_ids))

    def __post_init__(self):
        b, fc = self.context.shape[0], self.context.shape[2]
        if self.flags.shape != self.prompt_ids.shape or self.flags.shape[0] != b or self.flags.shape[1] <= fc:
            raise ValueError(
                f"flags {tuple(self.flags.shape)} and prompt_ids {tuple(self.prompt_ids.shape)} must both be "
                f"[B={b}, Fc+F] with Fc={fc} context frames followed by the shot's frames")
        if self.text.dim() != 4 or self.text.shape[0] != b:
            raise ValueError(f"text must be [B={b}, P, S, text_dim], got {tuple(self.text.shape)}")


def make_conditioning(context: torch.Tensor, prompts: list[list[torch.Tensor]], context_flags: list[list[int]],
                      shot_flags: list[int], frames: int, text_len: int | None = None) -> ShotConditioning:
    """Batch per-sample histories. Sample i: prompts[i] (its P_i prompts, each [L, text_dim]),
    context_flags[i] (Fc ints), shot_flags[i]. Prompt ids are built per sample, so a sample with one prompt
    (a first shot, or a dropped history) reads its own caption whatever the others hold; prompts are then
    zero-padded to [B, max P, max S, text_dim]."""
    b = context.shape[0]
    if not (len(prompts) == len(context_flags) == len(shot_flags) == b):
        raise ValueError(f"need one prompt list, context flag list and shot flag per sample (B={b})")
    flags = torch.tensor([frame_flags(cf, sf, frames) for cf, sf in zip(context_flags, shot_flags)], dtype=torch.long)
    prompt_ids = prompt_ids_for(flags, [len(p) for p in prompts])
    text = pad_prompts(prompts, text_len)
    return ShotConditioning(context, text.to(context.device), flags.to(context.device), prompt_ids.to(context.device))


class SelfForcingRollout:
    """Block-by-block generation of one shot by the causal student, with a shared exit step."""

    def __init__(self, sampler: SamplerConfig, refresh_sigma: float | None = None):
        self.sampler = sampler
        self.schedule = FlowSchedule(sampler.num_train_timesteps, sampler.shift)
        self.timesteps = self.schedule.warp(sampler.denoising_steps)  # e.g. 1000, 957.9, 888.9, 737.6
        if refresh_sigma is None:  # the reference noises at t = 0: the nearest table sigma (0.0079 at shift 8)
            refresh_sigma = float(self.schedule.sigma(torch.zeros(1))[0])
        if not 0.0 <= refresh_sigma < 1.0:
            raise ValueError(f"refresh_sigma must be in [0, 1), got {refresh_sigma}")
        self.refresh_sigma = refresh_sigma

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def sample_exit_step(self, generator: torch.Generator | None = None) -> int:
        return int(torch.randint(0, self.num_steps, (1,), generator=generator))

    def __call__(self, student: CausalWanDiT, cond: ShotConditioning, noise: torch.Tensor, exit_step: int,
                 generator: torch.Generator | None = None, grad: bool = True) -> torch.Tensor:
        """noise [B, C, F, h, w] -> the shot's x0 [B, C, F, h, w] (with autograd through the exit step when
        `grad`). Fresh noise between steps (and the refresh noise) is drawn from `generator` on the CPU, in
        the engine's order, so a seeded generator reproduces engine.stream_shot exactly."""
        if not 0 <= exit_step < self.num_steps:
            raise ValueError(f"exit_step must be in [0, {self.num_steps}), got {exit_step}")
        sampler, sched = self.sampler, self.schedule
        b, _, frames, h, w = noise.shape
        fc = cond.context_frames
        if cond.flags.shape[1] != fc + frames:
            raise ValueError(f"flags cover {cond.flags.shape[1]} frames; context + shot is {fc + frames}")
        device = noise.device
        tpf = student.config.tokens_per_frame(h, w)
        cache = KVCache.for_model(student, b, fc + frames, tpf)
        flags, pids = cond.flags, cond.prompt_ids

        with torch.no_grad():
            # The text's K/V are made once, outside the graph: the reference fills its cross-attention cache in
            # the no-grad context pass, so the generator's text path never trains in the DMD stages.
            text_kv = student.encode_text(cond.text)
            # global cache: the history at t = 0
            student.forward_cached(cond.context, torch.zeros(b, fc, device=device), text_kv, flags[:, :fc], cache, 0,
                                   pids[:, :fc], shot_phase=sampler.rope_shot_phase)

        outputs = []
        spans = sampler.block_spans(frames)
        for b_index, (f0, f1) in enumerate(spans):
            sl = slice(fc + f0, fc + f1)
            x = noise[:, :, f0:f1]
            for k, t in enumerate(self.timesteps):
                t_frames = torch.full((b, f1 - f0), float(t), device=device)
                with torch.set_grad_enabled(grad and k == exit_step):
                    flow = student.forward_cached(x, t_frames, text_kv, flags[:, sl], cache, sl.start, pids[:, sl],
                                                  shot_phase=sampler.rope_shot_phase)
                    x0 = sched.x0_from_flow(x, flow, t_frames)  # [B, C, f, h, w]
                if k == exit_step:
                    break
                fresh = torch.randn(x.shape, generator=generator).to(device, x.dtype)
                x = sched.add_noise(x0, fresh, torch.full_like(t_frames, float(self.timesteps[k + 1])))
            outputs.append(x0)
            if b_index + 1 == len(spans):  # as the engine: no block attends to the last one
                break
            with torch.no_grad():  # cache refresh: the (slightly noised) clean block, told t = 0
                clean = x0.detach()
                if self.refresh_sigma > 0:
                    tiny = torch.randn(clean.shape, generator=generator).to(device, clean.dtype)
                    clean = (1 - self.refresh_sigma) * clean + self.refresh_sigma * tiny
                student.forward_cached(clean, torch.zeros_like(t_frames), text_kv, flags[:, sl], cache, sl.start,
                                       pids[:, sl], shot_phase=sampler.rope_shot_phase)
        return torch.cat(outputs, 2)
