"""Stage 2: ODE initialisation of the causal few-step student.

    python -m training.stage2_ode --config training/configs/tiny-stage2.yaml

The student (CausalWanDiT, initialised from the teacher's weights) sees [context at t = 0 | the target shot
where every block (SamplerConfig.block_spans) sits at its own random level among the 5 stored ODE
levels (the 4 few-step times and the clean end)], under the block-causal mask: context frames see only
context, block b sees the context and blocks 0..b. It regresses the teacher's x0 (x0 = x_t - sigma v) with
MSE on the frames whose t > 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from shotstream_core.config import SamplerConfig, get_preset
from shotstream_core.loading import save_dit
from shotstream_core.model import CausalWanDiT, block_causal_mask
from shotstream_core.schedule import FlowSchedule

from .common import (StageConfig, optimizer_step, StepBatches, autocast, enable_grad_checkpointing, load_dit,
                     mark_done, preset_for_weights, run_stage, save_config, set_lr, lr_at, step_generator, train_loop)
from .data import LatentStoryDataset, pad_prompts
from .ode_pairs import ODEPairs


@dataclass
class Stage2Config(StageConfig):
    out_dir: str = "runs/tiny/stage2"
    ode_dir: str = "runs/tiny/ode"
    latent_dir: str = "runs/tiny/latents"
    teacher_path: str = "runs/tiny/teacher/teacher.safetensors"
    lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    batch_size: int = 16
    export: str = ""  # optional copy of student.safetensors (the interim shipped dit.safetensors)
    # Latent frames of a shot's first block (0: the preset's block_frames, as the reference). The student
    # file records it, so stages 3-4 and the engine run the blocks it was trained on.
    first_block_frames: int = 0
    # AdamW's betas: the tiny recipe's (0.9, 0.99), as its from-scratch teacher; the reference's stage 2 uses
    # (0, 0.999) on its Wan2.1 fine-tune.
    beta1: float = 0.9
    beta2: float = 0.99


def block_levels(batch: int, block_ids: torch.Tensor, num_levels: int, g) -> torch.Tensor:
    """[B, F] level index per frame, constant inside each block (block_ids [F]: each frame's block)."""
    per_block = torch.randint(0, num_levels, (batch, int(block_ids.max()) + 1), generator=g)
    return per_block[:, block_ids]


def ode_batch(pairs: ODEPairs, ds: LatentStoryDataset, idx: list[int], sampler: SamplerConfig, text_len: int, g):
    """-> x_t [B, C, F, h, w], t [B, F], x0, context, flags, prompt ids, text."""
    lat = pairs.latents[idx]  # [B, L, C, F, h, w]
    b, num_levels, _, f = lat.shape[:4]
    level = block_levels(b, sampler.block_ids(f), num_levels, g)  # [B, F]
    gather = level[:, None, None, :, None, None].expand(-1, 1, *lat.shape[2:])
    x_t = lat.gather(1, gather)[:, 0]  # [B, C, F, h, w]
    t = pairs.timesteps[level]  # [B, F]
    texts = []
    for story_i, k in pairs.target[idx].tolist():
        texts.append(list(ds[story_i].prompt_features[: k + 1]))
    return (x_t, t, lat[:, -1], pairs.context[idx], pairs.flags[idx], pairs.prompt_ids[idx],
            pad_prompts(texts, text_len))


def ode_loss(model, schedule, batch, mask, device, shot_phase: float) -> torch.Tensor:
    """MSE between the student's x0 and the teacher's x0 on target frames with t > 0."""
    x_t, t, x0, context, flags, prompt_ids, text = batch
    b, fc = x_t.shape[0], context.shape[2]
    seq = torch.cat([context, x_t], dim=2).to(device)
    t_all = torch.cat([torch.zeros(b, fc), t], dim=1).to(device)  # context at t = 0
    v = model(seq, t_all, text.to(device), flags.to(device), prompt_ids.to(device), mask=mask,
              shot_phase=shot_phase)[:, :, fc:]
    x0_hat = schedule.x0_from_flow(x_t.to(device), v, t.to(device))
    err = ((x0_hat.float() - x0.to(device)) ** 2).mean(dim=(1, 3, 4))  # [B, F]
    noisy = (t > 0).to(device).float()
    return (err * noisy).sum() / noisy.sum().clamp_min(1.0)


def train(cfg: Stage2Config, dist) -> dict:
    """Regress the teacher's ODE endpoints with the block-causal student."""
    if cfg.first_block_frames < 0:
        raise ValueError(f"config first_block_frames: {cfg.first_block_frames} must be >= 0 (0: the preset's "
                         f"blocks; 1: the first latent frame as a block of its own)")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    preset = get_preset(cfg.preset)
    sampler = preset.sampler
    if cfg.first_block_frames:
        sampler = dataclasses.replace(sampler, first_block_frames=cfg.first_block_frames)
    schedule = FlowSchedule(sampler.num_train_timesteps, sampler.shift)
    pairs = ODEPairs(cfg.ode_dir)
    ds = LatentStoryDataset(cfg.latent_dir)
    student = load_dit(cfg.teacher_path, CausalWanDiT, "teacher (stage 1)", dist.device)
    preset = preset_for_weights(preset, student.config, cfg.teacher_path)
    ds.check_fits(preset, f"the student from {cfg.teacher_path}")
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(student)
    model = dist.wrap(student)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(cfg.beta1, cfg.beta2))
    batches = StepBatches(len(pairs), cfg.batch_size, dist, cfg.seed)
    _, _, _, f, h, w = pairs.latents.shape
    mask = block_causal_mask(pairs.context.shape[2], sampler.block_ids(f), preset.dit.tokens_per_frame(h, w),
                             dist.device)

    def step_fn(step: int) -> dict:
        g = step_generator(cfg.seed, step, dist.rank)
        batch = ode_batch(pairs, ds, batches.indices(step), sampler, preset.dit.text_len, g)
        set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_horizon))
        with autocast(cfg, dist.device):
            loss = ode_loss(model, schedule, batch, mask, dist.device, sampler.rope_shot_phase)
        gn = optimizer_step(loss, opt, student.parameters(), cfg.grad_clip)
        return {"loss": float(dist.all_mean(loss.detach())), "grad_norm": float(gn), "lr": opt.param_groups[0]["lr"]}

    summary = train_loop(cfg, dist, {"student": student}, {"student": opt}, step_fn, desc="stage2",
                         sampler=sampler)
    if dist.is_main:
        student.eval()
        save_dit(student, out / "student.safetensors", sampler, vae_signature=ds.vae_signature)
        if cfg.export:
            save_dit(student, cfg.export, sampler, vae_signature=ds.vae_signature)
            print(f"exported {cfg.export}", flush=True)
        mark_done(out, **summary)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(train, Stage2Config, argv)


if __name__ == "__main__":
    main()
