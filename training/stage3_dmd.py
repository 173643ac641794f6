"""Stage 3: intra-shot self-forcing DMD on ground-truth history.

    python -m training.stage3_dmd --config training/configs/tiny-stage3.yaml [--set key=value ...]
    torchrun --nproc_per_node 2 -m training.stage3_dmd --config ...      (gloo on CPU, NCCL on CUDA)

Generator = the stage-2 causal student; real score = the frozen stage-1 teacher (CFG on its x0);
fake score = a trainable copy of the teacher. Each step takes a batch of (story, shot) targets; the
history of a target shot is its story's ground-truth earlier shots, chosen and encoded by the inference
rule (data.LatentStoryDataset.history), and with probability history_dropout it is dropped (zero context
with flags 0, the shot flag 1, the shot's own prompt only). The student rolls the shot out block by block
(rollout.py) and one optimiser step follows: the generator's DMD step once every 1 + critic_per_generator steps, the critic's
flow-matching step otherwise. Resume, time budget, logs and plots come from common.train_loop.

Output: OUT/student.safetensors (the generator, loadable by the engine), OUT/loss.png, OUT/log.jsonl,
OUT/done.json, and a copy at `export` when set.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from shotstream_core.config import get_preset
from shotstream_core.loading import ModelLoadError, sampler_for_dit, save_dit
from shotstream_core.model import CausalWanDiT, WanDiT

from .common import (Dist, StageConfig, autocast, describe_dit, enable_grad_checkpointing, load_dit, mark_done,
                     preset_for_weights, run_stage, save_config, step_generator, train_loop, unwrap)
from .data import LatentStoryDataset, first_shot_inputs
from .dmd import DMDHyper, DMDTrainer, is_generator_step, uncond_like
from .rollout import SelfForcingRollout, make_conditioning


@dataclass
class DMDStageConfig(StageConfig):
    """Fields shared by stages 3 and 4. lr / grad_clip are the generator's; the critic has its own."""

    out_dir: str = "runs/tiny/stage3"
    teacher_path: str = "runs/tiny/teacher/teacher.safetensors"  # real score, and the fake score's start
    student_path: str = "runs/tiny/stage2/student.safetensors"  # the generator's start
    latent_dir: str = "runs/tiny/latents"
    export: str = ""  # optional copy of student.safetensors (e.g. into shotstream_core/weights/tiny)
    batch_size: int = 4
    max_steps: int = 100000
    lr: float = 2e-5  # generator (reference 2e-6 for a pretrained 1.3B)
    lr_critic: float = 4e-6  # critic (reference 4e-7); keep the 5:1 ratio
    warmup_steps: int = 0  # the reference uses constant learning rates
    beta1: float = 0.0
    beta2: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # generator
    grad_clip_critic: float = 10.0
    guidance: float = 3.0  # CFG on the real score
    # History guidance on the real score (1: off, the recipe): + (h - 1) (cond - cond without history), the
    # shot taken as a first shot. The teacher sampled this way keeps far more of a hidden place
    # (docs/EXPERIMENTS.md, "A true first shot").
    history_guidance: float = 1.0
    t_min: int = 20  # DMD / critic timestep: a uniform table index's timestep, clamped to [t_min, t_max]
    t_max: int = 980
    critic_per_generator: int = 5
    refresh_sigma: float | None = None  # noise on the cache-refresh input (told t = 0); None: the reference's
    # add_noise at t = 0, the table's sigma nearest it (0.0079 at shift 8, 0.001 at the tiny preset's shift 1)
    history_dropout: float = 0.1  # zero context + own caption, as the teacher was trained
    ckpt_every: int = 50

    def hyper(self) -> DMDHyper:
        return DMDHyper(lr_generator=self.lr, lr_critic=self.lr_critic, betas=(self.beta1, self.beta2),
                        weight_decay=self.weight_decay, guidance=self.guidance,
                        history_guidance=self.history_guidance, t_min=self.t_min,
                        t_max=self.t_max, critic_per_generator=self.critic_per_generator,
                        grad_clip_generator=self.grad_clip,
                        grad_clip_critic=self.grad_clip_critic)

    def lengthens_exactly(self) -> bool:
        return True  # constant learning rates after warmup: more steps go on as a longer run would


class DMDSetup:
    """Models, trainer and data shared by stages 3 and 4."""

    def __init__(self, cfg: DMDStageConfig, dist: Dist):
        self.cfg, self.dist = cfg, dist
        dev = dist.device
        teacher = load_dit(cfg.teacher_path, WanDiT, "teacher (stage 1)", dev, frozen=True)
        student = load_dit(cfg.student_path, CausalWanDiT, "student", dev)
        # The teacher's shape is the run's (a teacher trained with dit: changes); the student must share it.
        self.preset = preset_for_weights(get_preset(cfg.preset), teacher.config, cfg.teacher_path)
        # The student rolls out on the blocks stage 2 trained it on (its file records them).
        self.preset = dataclasses.replace(self.preset, sampler=sampler_for_dit(cfg.student_path, self.preset.sampler))
        if student.config != teacher.config:
            raise ModelLoadError(f"{cfg.student_path} is a {describe_dit(student.config)} DiT but the teacher "
                                 f"{cfg.teacher_path} is a {describe_dit(teacher.config)} one: start the student "
                                 f"from this teacher's stage 2")
        fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.prepare(student, fake)
        if cfg.grad_checkpointing:  # GPU memory: recompute blocks in backward (cache writes are idempotent)
            enable_grad_checkpointing(student)
            enable_grad_checkpointing(fake)
        # The generator's rollout calls forward_cached many times per backward, so its gradients are
        # averaged by hand (dmd.sync_gradients); DDP still broadcasts its start. The critic is plain DDP.
        self.student, self.fake, self.teacher = dist.wrap(student), dist.wrap(fake), teacher
        self.rollout = SelfForcingRollout(self.preset.sampler, cfg.refresh_sigma)
        self.trainer = DMDTrainer(self.student, teacher, self.fake, self.rollout, cfg.hyper(), dist,
                                  autocast=lambda: autocast(cfg, dev))
        self.data = LatentStoryDataset(cfg.latent_dir)
        self.data.check_fits(self.preset, f"the teacher {cfg.teacher_path}")
        self._stories = {}
        geo = self.data.geometry(self.preset)
        self.shot_shape = (self.preset.dit.in_channels, geo.latent_frames, geo.latent_height, geo.latent_width)

    def prepare(self, student, fake) -> None:
        """Hook for stage 4 (LoRA) before the models are wrapped and their optimisers made."""

    @property
    def modules(self) -> dict:
        return {"generator": self.student, "critic": self.fake}

    @property
    def optimizers(self) -> dict:
        return {"generator": self.trainer.opt_g, "critic": self.trainer.opt_c}

    def story(self, i: int):
        if i not in self._stories:
            self._stories[i] = self.data[i]
        return self._stories[i]

    def set_lr(self, step: int) -> None:
        warm = 1.0 if self.cfg.warmup_steps <= 0 else min(1.0, (step + 1) / self.cfg.warmup_steps)
        for opt, base in ((self.trainer.opt_g, self.cfg.lr), (self.trainer.opt_c, self.cfg.lr_critic)):
            for group in opt.param_groups:
                group["lr"] = base * warm

    def first_shot(self, story, k: int):
        """(context, context flags, shot flag, prompts) of shot k as a first shot (data.first_shot_inputs):
        for shot 0, and for a dropped history."""
        c, _, h, w = self.shot_shape
        return first_shot_inputs((c, h, w), self.preset.sampler.context_frames, story.prompt_features[: k + 1])

    def truth_history(self, story, k: int):
        """(context, context flags, shot flag) of shot k from its story's ground-truth earlier shots, chosen and
        encoded by the inference rule (data.LatentStoryDataset.history)."""
        ctx, flags = self.data.history(story, k, self.preset.sampler.context_frames)
        return ctx, flags[:-1], flags[-1]

    def train_step(self, step: int, context, prompts, ctx_flags, shot_flags, generator) -> tuple[dict, torch.Tensor]:
        """Batch the samples and do one generator or critic update; returns (scalars, generated shot)."""
        dev = self.dist.device
        cond = make_conditioning(torch.stack(context).to(dev), prompts, ctx_flags, shot_flags, self.shot_shape[1],
                                 self.preset.dit.text_len)
        uncond = uncond_like(cond.text, self.data.negative[: self.preset.dit.text_len].to(dev))
        noise = torch.randn(len(context), *self.shot_shape, generator=generator).to(dev)
        self.set_lr(step)
        stats, shot = self.trainer.step(step, cond, uncond, noise, generator)
        stats = {k: float(self.dist.all_mean(torch.tensor(float(v)))) for k, v in stats.items()}
        return stats, shot

    def export(self, generator_state: dict | None = None) -> Path:
        """OUT/student.safetensors (+ the `export` copy) from the generator's weights."""
        model = CausalWanDiT(self.preset.dit)
        model.load_state_dict(generator_state if generator_state is not None else unwrap(self.student).state_dict())
        vae = self.data.vae_signature
        path = save_dit(model, Path(self.cfg.out_dir) / "student.safetensors", self.preset.sampler,
                        vae_signature=vae)
        if self.cfg.export:
            save_dit(model, self.cfg.export, self.preset.sampler, vae_signature=vae)
            print(f"exported {self.cfg.export}", flush=True)
        return path


def intra_shot_batch(setup: DMDSetup, generator: torch.Generator):
    """Per sample: a random (story, shot) target with its ground-truth history (or a dropped one)."""
    cfg = setup.cfg
    picks = torch.randint(0, len(setup.data.targets), (cfg.batch_size,), generator=generator).tolist()
    drops = (torch.rand(cfg.batch_size, generator=generator) < cfg.history_dropout).tolist()
    context, prompts, ctx_flags, shot_flags = [], [], [], []
    for pick, drop in zip(picks, drops):
        i, k = setup.data.targets[pick]
        story = setup.story(i)
        if k == 0 or drop:  # the shot's OWN caption, alone (the reference used the second shot's)
            ctx, flags, shot_flag, shot_prompts = setup.first_shot(story, k)
        else:
            ctx, flags, shot_flag = setup.truth_history(story, k)
            shot_prompts = story.prompt_features[: k + 1]
        context.append(ctx)
        prompts.append(shot_prompts)
        ctx_flags.append(flags)
        shot_flags.append(shot_flag)
    return context, prompts, ctx_flags, shot_flags


def train(cfg: DMDStageConfig, dist: Dist) -> dict:
    """Stage 3: intra-shot self-forcing DMD on ground-truth history."""
    out = Path(cfg.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    setup = DMDSetup(cfg, dist)

    def step_fn(step: int) -> dict:
        gen = step_generator(cfg.seed, step, dist.rank)
        stats, _ = setup.train_step(step, *intra_shot_batch(setup, gen), gen)
        return stats

    summary = train_loop(cfg, dist, setup.modules, setup.optimizers, step_fn, desc="stage3 dmd",
                         sampler=setup.preset.sampler)
    if dist.is_main:
        summary["student"] = str(setup.export())
        mark_done(out, **summary)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(train, DMDStageConfig, argv)


if __name__ == "__main__":
    main()


__all__ = ["DMDStageConfig", "DMDSetup", "intra_shot_batch", "is_generator_step", "train"]
