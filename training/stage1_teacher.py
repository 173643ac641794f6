"""Stage 1: the bidirectional next-shot teacher.

    python -m training.stage1_teacher --config training/configs/tiny-teacher.yaml

A training sample is one shot k of a story (every k, so shot 0 with its all-zero context is trained too).
Its history is the earlier shots' ground-truth single-frame latents picked by the context rule, with shot
flags from the absolute ranges (context frames carry their shot index, the target carries k, or 1 for
shot 0). Input [Fc clean context | noisy target], one timestep per sample (the context sees the same t);
loss w(t) * MSE of the flow (noise - x0) on the target frames. 10% of samples lose their context (zeros,
flags 0), 10% their text: every prompt becomes the negative prompt's features, the unconditional input CFG
uses at sampling (text_dropout_to: zeros gives the reference's zero features). Each frame cross-attends to its own shot's prompt.

Unlike the reference (self-attention only, lr 1e-5, fine-tuning a pre-trained Wan), the tiny model starts
from scratch, so every parameter trains, with AdamW, warmup and a from-scratch learning rate.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shotstream_core.config import get_preset
from shotstream_core.loading import load_dit_state, save_dit
from shotstream_core.model import WanDiT
from shotstream_core.schedule import FlowSchedule

from .common import (StageConfig, optimizer_step, StepBatches, autocast, describe_dit, enable_grad_checkpointing,
                     mark_done, run_stage, preset_with_dit, save_config, set_lr, lr_at, step_generator,
                     train_loop)
from .data import LatentStoryDataset, first_shot_inputs, frame_flags, pad_prompts, prompt_ids_for
from .detail import detail_weights


@dataclass
class TeacherConfig(StageConfig):
    out_dir: str = "runs/tiny/teacher"
    latent_dir: str = "runs/tiny/latents"
    lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    batch_size: int = 16
    context_dropout: float = 0.1
    text_dropout: float = 0.1
    # What a dropped caption becomes: "negative" = the features of the negative prompt (""), which is what
    # CFG's unconditional branch feeds the model everywhere (ODE pairs, DMD real score, evaluation);
    # "zeros" = zero features, as the reference (whose pretrained Wan already knows its negative prompt).
    text_dropout_to: str = "negative"
    export: str = ""  # optional copy of teacher.safetensors
    # Exponential moving average of the weights (0 = off); with it on, the EMA weights are exported and
    # sampled: a from-scratch model's raw weights jitter with the last batches, the average does not.
    ema_decay: float = 0.0
    # Loss weight over t: "bell" is the reference's (Wan's training weights: zero at t=1000, made for
    # fine-tuning a model that already denoises); "uniform" weighs every noise level alike, which a model
    # trained from scratch needs: with the bell it never learns the first, layout-setting sampling steps.
    loss_weighting: str = "bell"
    sample_stories: int = 4  # decoded samples for the contact sheet at the end (0 = none)
    sample_guidance: float = 3.0
    sample_steps: int = 50
    vae_path: str = "runs/tiny/decoder/vae.safetensors"
    # Start from these DiT weights instead of a random init (a warm start, e.g. an earlier teacher after
    # the VAE was refined: its latents moved, but not far). Empty: from scratch.
    init_from: str = ""
    # Extra loss weight on the latent cells that hold small things (training.detail; 0 = off): a character
    # is ~5% of a frame, so the plain mean is almost all sky and ground, which the model learns first and
    # best while the characters stay mush.
    detail_weight: float = 0.0
    # Loss weight of each target shot's first latent frame against the others (1 = uniform). That frame is
    # the VAE's single-frame code, and a teacher's flow error there is 2-3x the rest's (training.diagnose
    # --by-frame): its samples then open on a frame unlike the next, which the analyser reads as a cut.
    first_frame_weight: float = 1.0
    # What trains: "all" (the tiny teacher, from scratch) or "self_attn" (the blocks' self-attention only,
    # as the reference fine-tunes a pretrained Wan2.1 into the next-shot teacher; use with init_from).
    trainable: str = "all"
    # AdamW's betas and the clip (common grad_clip, 1.0 here): the reference's stage 1 uses betas (0, 0.999)
    # and grad_clip 10.0; the tiny recipe's from-scratch teacher keeps (0.9, 0.99) and 1.0.
    beta1: float = 0.9
    beta2: float = 0.99
    # Changes to the preset's DiT shape, e.g. {patch_size: [1, 1, 1]} (tiny: 8x8 tokens a frame, not 4x4).
    # Only the teacher chooses the architecture: ODE pairs and stages 2-4 read it from its weights.
    dit: dict = field(default_factory=dict)


@dataclass
class TeacherBatch:
    """[B, C, Fc+F, h, w] clean sequence, noise on the target frames, flags/prompt ids [B, Fc+F],
    text [B, P, S, D]."""

    context: torch.Tensor  # [B, C, Fc, h, w]
    x0: torch.Tensor  # [B, C, F, h, w]
    flags: torch.Tensor  # [B, Fc+F]
    prompt_ids: torch.Tensor  # [B, Fc+F]
    text: torch.Tensor  # [B, P, S, D]
    negative: torch.Tensor  # [B, 1, S, D]
    detail: torch.Tensor | None = None  # [B, F, h, w] pixel detail of the target's latent cells (None: not stored)


def make_batch(ds: LatentStoryDataset, targets: list[tuple[int, int]], context_frames: int, text_len: int,
               g: torch.Generator | None = None, context_dropout: float = 0.0, text_dropout: float = 0.0,
               text_dropout_to: str = "negative") -> TeacherBatch:
    """Assemble (story, shot k) targets with their ground-truth history; applies the dropouts."""
    if text_dropout_to not in ("negative", "zeros"):
        raise ValueError(f"text_dropout_to must be 'negative' or 'zeros', got {text_dropout_to!r}")
    ctxs, x0s, flags, prompts, counts, details = [], [], [], [], [], []
    for i, k in targets:
        story = ds[i]
        details.append(None if story.detail is None else story.detail[k])
        context, fl = ds.history(story, k, context_frames)
        x0 = story.shot_latents[k]
        ctx_flags, shot_flag = fl[:-1], fl[-1]
        texts = list(story.prompt_features[: k + 1])  # prompts of shots 0..k; frames pick theirs by flag
        u = torch.rand(2, generator=g)
        if u[0] < context_dropout:
            context, ctx_flags, shot_flag, texts = first_shot_inputs(
                (context.shape[0], *context.shape[2:]), context.shape[1], texts, context.dtype)
        if u[1] < text_dropout:
            texts = ([ds.negative.clone() for _ in texts] if text_dropout_to == "negative"
                     else [torch.zeros_like(t) for t in texts])
        ctxs.append(context)
        x0s.append(x0)
        flags.append(frame_flags(ctx_flags, shot_flag, x0.shape[1]))
        prompts.append(texts)
        counts.append(len(texts))
    flags_t = torch.tensor(flags, dtype=torch.long)
    neg = ds.negative[:text_len][None, None].expand(len(targets), 1, -1, -1)
    detail = None if any(d is None for d in details) else torch.stack(details)
    return TeacherBatch(torch.stack(ctxs), torch.stack(x0s), flags_t, prompt_ids_for(flags_t, counts),
                        pad_prompts(prompts, text_len), neg.contiguous(), detail)


def teacher_loss(model, schedule: FlowSchedule, batch: TeacherBatch, g: torch.Generator, device,
                 shot_phase: float, weighting: str = "bell", detail_weight: float = 0.0,
                 first_frame_weight: float = 1.0) -> torch.Tensor:
    """w(t) * mean over target frames of (v_hat - (noise - x0))^2, averaged over the batch
    (w = the schedule's bell for weighting "bell", 1 for "uniform"). With detail_weight > 0 the mean over
    latent cells is weighted by training.detail.detail_weights of the batch's detail maps; the shot's
    first latent frame counts first_frame_weight times."""
    if detail_weight > 0 and batch.detail is None:
        raise ValueError("detail_weight > 0 needs the latents' detail maps, which this latent set lacks: "
                         "re-run training.preencode (it stores them), or set detail_weight: 0")
    b, fc = batch.x0.shape[0], batch.context.shape[2]
    t = schedule.sample_training_t((b,), generator=g)
    noise = torch.randn(batch.x0.shape, generator=g)
    x_t = schedule.add_noise(batch.x0, noise, t)
    seq = torch.cat([batch.context, x_t], dim=2).to(device)
    v = model(seq, t.to(device), batch.text.to(device), batch.flags.to(device), batch.prompt_ids.to(device),
              shot_phase=shot_phase)[:, :, fc:]
    target = schedule.flow_target(batch.x0, noise).to(device)
    err = ((v.float() - target) ** 2).mean(dim=1)  # [B, F, h, w]
    w = detail_weights(batch.detail.to(err.device), detail_weight) if detail_weight > 0 else torch.ones_like(err)
    w = torch.cat([w[:, :1] * first_frame_weight, w[:, 1:]], dim=1)
    per_sample = (err * w).sum(dim=(1, 2, 3)) / w.sum(dim=(1, 2, 3))
    if weighting == "uniform":
        return per_sample.mean()
    return (schedule.training_weight(t).to(device) * per_sample).mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def build_teacher(preset, device, seed: int, init_from: str = "") -> tuple[WanDiT, list[str]]:
    """The teacher to train, and the names of the weights it adds to its init_from weights (none from scratch)."""
    torch.manual_seed(seed)
    teacher = WanDiT(preset.dit)
    missing = []
    if init_from:
        sd, found = load_dit_state(init_from)
        # pooled_text and coded_alone_frames add weights that start as a no-op: a trained model without them
        # warm-starts into them exactly
        adds = {k: getattr(preset.dit, k) for k in ("pooled_text", "coded_alone_frames")
                if getattr(preset.dit, k) and not getattr(found, k)}
        if found != preset.dit and dataclasses.replace(found, **adds) != preset.dit:
            raise ValueError(f"init_from {init_from} is a {describe_dit(found)} DiT; this run builds a "
                             f"{describe_dit(preset.dit)} one (the {preset.name} preset with the config's dit: "
                             f"changes): start from scratch, or set dit: to match the weights")
        missing, _ = teacher.load_state_dict(sd, strict=not adds)
        assert all(k.startswith("text_pool.") or k == "coded_alone" for k in missing), missing
    return teacher.to(device), missing


def train(cfg: TeacherConfig, dist) -> dict:
    """Train the bidirectional next-shot teacher from scratch on pre-encoded stories."""
    if cfg.loss_weighting not in ("bell", "uniform"):
        raise ValueError(f"loss_weighting must be 'bell' or 'uniform', got {cfg.loss_weighting!r}")
    if cfg.trainable not in ("all", "self_attn"):
        raise ValueError(f"trainable must be 'all' or 'self_attn' (the reference's fine-tune), got {cfg.trainable!r}")
    if cfg.first_frame_weight <= 0:
        raise ValueError(f"first_frame_weight must be > 0 (1 = uniform), got {cfg.first_frame_weight}")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    preset = preset_with_dit(get_preset(cfg.preset), cfg.dit)
    sampler = preset.sampler
    ds = LatentStoryDataset(cfg.latent_dir)
    ds.check_fits(preset, "the teacher")
    schedule = FlowSchedule(sampler.num_train_timesteps, sampler.shift)
    teacher, added = build_teacher(preset, dist.device, cfg.seed, cfg.init_from)
    if cfg.trainable == "self_attn":  # the reference's fine-tune; weights new to init_from train too (else they stay 0)
        for name, p in teacher.named_parameters():
            p.requires_grad_(".self_attn." in name or name in added)
    # copied before gradient checkpointing patches the blocks' forward
    ema = copy.deepcopy(teacher).requires_grad_(False) if cfg.ema_decay > 0 else None
    if cfg.grad_checkpointing:
        enable_grad_checkpointing(teacher)
    model = dist.wrap(teacher)
    opt = torch.optim.AdamW([p for p in teacher.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))
    batches = StepBatches(len(ds.targets), cfg.batch_size, dist, cfg.seed)
    modules = {"teacher": teacher}
    if ema is not None:
        modules["ema"] = ema  # checkpointed with the rest, so resume stays exact

    def step_fn(step: int) -> dict:
        g = step_generator(cfg.seed, step, dist.rank)
        targets = [ds.targets[i] for i in batches.indices(step)]
        batch = make_batch(ds, targets, sampler.context_frames, preset.dit.text_len, g,
                           cfg.context_dropout, cfg.text_dropout, cfg.text_dropout_to)
        set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_horizon))
        with autocast(cfg, dist.device):
            loss = teacher_loss(model, schedule, batch, g, dist.device, sampler.rope_shot_phase, cfg.loss_weighting,
                                cfg.detail_weight, cfg.first_frame_weight)
        gn = optimizer_step(loss, opt, teacher.parameters(), cfg.grad_clip)
        if ema is not None:
            update_ema(ema, teacher, min(cfg.ema_decay, (1 + step) / (10 + step)))
        return {"loss": float(dist.all_mean(loss.detach())), "grad_norm": float(gn), "lr": opt.param_groups[0]["lr"]}

    summary = train_loop(cfg, dist, modules, {"teacher": opt}, step_fn, desc="teacher")
    if dist.is_main:
        shipped = (ema if ema is not None else teacher).eval()
        save_dit(shipped, out / "teacher.safetensors", vae_signature=ds.vae_signature)
        if cfg.export:
            save_dit(shipped, cfg.export, vae_signature=ds.vae_signature)
            print(f"exported {cfg.export}", flush=True)
        if cfg.sample_stories > 0 and Path(cfg.vae_path).is_file():
            from .ode_pairs import teacher_sheet

            teacher_sheet(shipped, ds, cfg.vae_path, out / "samples.png", cfg.sample_stories,
                          cfg.sample_guidance, cfg.sample_steps, preset, seed=cfg.seed)
        mark_done(out, **summary)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(train, TeacherConfig, argv)


if __name__ == "__main__":
    main()
