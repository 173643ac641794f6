"""Stage 4: inter-shot self-forcing DMD on the model's own history.

    python -m training.stage4_dmd --config training/configs/tiny-stage4.yaml [--set key=value ...]

Same losses and 1:critic_per_generator update cycle as stage 3, but a batch of clips is rolled out shot
by shot, in order, with one optimiser step per shot. The history of shot k is the student's own shots
0..k-1 of that clip: decoded with the VAE, rounded to 8-bit frames as a story state keeps them, and the
frames chosen by the inference rule (context.plan_context) encoded one at a time
(context.encode_frame_alone), exactly as the engine builds its context. Shot 0, and a sample whose history
is dropped, train with the shot's OWN caption alone (the reference paired them with the second shot's).
Optionally (truth_history > 0) a share of the later shots' samples take their story's ground-truth
history instead, as in stage 3 (replay of the stage-3 task; off in the tiny recipe).

Optionally (lora_rank > 0) generator and critic train LoRA adapters on every Linear of every block; the
exported student has them merged into full weights, and OUT/lora.safetensors keeps the generator's
adapter in PEFT naming. The tiny model fine-tunes fully (lora_rank 0).

Each rank's clip in progress (its stories and generated shots) is part of the checkpoint, so a stop
mid-clip resumes exactly, under torchrun too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from shotstream_core.context import encode_frame_alone, plan_context
from shotstream_core.files import save_tensors
from shotstream_core.loading import blocks_metadata
from shotstream_core.vae import load_vae

from .common import Dist, mark_done, run_stage, save_config, step_generator, train_loop, unwrap
from .dmd import DMDHyper
from .lora import adapter_state_dict, apply_lora, merged_state_dict
from .stage3_dmd import DMDSetup, DMDStageConfig

LORA_STREAM = 20  # step_generator stream of the adapters' initial A matrices (+1: the critic's)
TRUTH_STREAM = 30  # stream of the truth_history draws: its own, so the recipe's other draws stay as they were


@dataclass
class Stage4Config(DMDStageConfig):
    out_dir: str = "runs/tiny/stage4"
    student_path: str = "runs/tiny/stage3/student.safetensors"
    vae_path: str = "runs/tiny/decoder/vae.safetensors"
    shots_per_clip: int = 4  # shots rolled out in order per clip (stories with fewer are skipped)
    lora_rank: int = 0  # 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = rank
    lora_critic: bool = True  # the critic trains LoRA too (as the reference), else fully
    truth_history: float = 0.0  # share of shot >= 1 samples conditioned on their story's ground-truth
    # history (stage 3's task) instead of their own; the clip still rolls on with the shot they generate

    def hyper(self) -> DMDHyper:
        # one optimiser step a shot: the generator/critic cycle slips so that every shot index trains both
        return dataclasses.replace(super().hyper(), clip_steps=self.shots_per_clip)


class InterShotSetup(DMDSetup):
    def __init__(self, cfg: Stage4Config, dist: Dist):
        if not 0.0 <= cfg.truth_history <= 1.0:
            raise ValueError(f"truth_history is a share of samples, got {cfg.truth_history}: set it in 0..1")
        super().__init__(cfg, dist)
        if not Path(cfg.vae_path).is_file():
            raise FileNotFoundError(f"VAE weights not found at {cfg.vae_path}: run the VAE stage first, or set vae_path=")
        self.vae = load_vae(cfg.vae_path, torch.float32, dist.device).eval().requires_grad_(False)
        self.clips = [i for i, s in enumerate(self.data.stories) if s["num_shots"] >= cfg.shots_per_clip]
        if len(self.clips) < cfg.batch_size:
            longest = max(s["num_shots"] for s in self.data.stories)
            raise ValueError(f"only {len(self.clips)} stories have >= {cfg.shots_per_clip} shots (longest: "
                             f"{longest}); lower shots_per_clip or batch_size")
        self.frames_per_shot = self.preset.geometry.frames_per_shot

    def prepare(self, student, fake) -> None:
        cfg = self.cfg
        if cfg.lora_rank > 0:
            alpha = cfg.lora_alpha or cfg.lora_rank
            # seeded, as every other draw of a stage: the same config trains the same adapter, and resumes it
            apply_lora(student, cfg.lora_rank, alpha,
                       generator=step_generator(cfg.seed, 0, 0, stream=LORA_STREAM))
            if cfg.lora_critic:
                apply_lora(fake, cfg.lora_rank, alpha,
                           generator=step_generator(cfg.seed, 0, 0, stream=LORA_STREAM + 1))

    @torch.no_grad()
    def to_frames(self, shot: torch.Tensor) -> torch.Tensor:
        """Generated latents [B, C, F, h, w] -> uint8 frames [B, N, H, W, 3], as a StoryState stores them."""
        pixels = self.vae.decode(shot.float())  # [B, 3, N, H, W] in [-1, 1]
        return ((pixels.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()

    @torch.no_grad()
    def own_history(self, history: list[torch.Tensor], b: int):
        """Context of sample b from its generated shots (the engine's rule): ([C, Fc, h, w], flags, shot flag)."""
        plan = plan_context([self.frames_per_shot] * len(history), self.preset.sampler.context_frames)
        latents = [encode_frame_alone(self.vae, history[s][b, i]) for s, i in plan.picks]  # Fc x [C, h, w]
        return torch.stack(latents, dim=1).cpu(), list(plan.flags), plan.shot_flag

    def export_lora(self) -> dict:
        """Merged generator weights; the adapter itself goes to OUT/lora.safetensors."""
        student = unwrap(self.student)
        save_tensors(adapter_state_dict(student), Path(self.cfg.out_dir) / "lora.safetensors",
                     metadata=blocks_metadata(self.preset.sampler) or None)
        return merged_state_dict(student)


def train(cfg: Stage4Config, dist: Dist) -> dict:
    """Stage 4: inter-shot self-forcing DMD on the model's own history."""
    out = Path(cfg.out_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    setup = InterShotSetup(cfg, dist)
    clip = {"stories": [], "shot": 0, "history": []}  # the clip in progress; saved with checkpoints

    def step_fn(step: int) -> dict:
        if not clip["stories"] or clip["shot"] >= cfg.shots_per_clip:  # a new clip
            pick = step_generator(cfg.seed, step, dist.rank, stream=1)
            order = torch.randperm(len(setup.clips), generator=pick)[: cfg.batch_size].tolist()
            clip.update(stories=[setup.clips[i] for i in order], shot=0, history=[])
        k = clip["shot"]
        gen = step_generator(cfg.seed, step, dist.rank)
        drops = (torch.rand(cfg.batch_size, generator=gen) < cfg.history_dropout).tolist()
        truths = [False] * cfg.batch_size
        if cfg.truth_history > 0:
            pick_truth = step_generator(cfg.seed, step, dist.rank, stream=TRUTH_STREAM)
            truths = (torch.rand(cfg.batch_size, generator=pick_truth) < cfg.truth_history).tolist()
        context, prompts, ctx_flags, shot_flags = [], [], [], []
        for b, (i, drop, truth) in enumerate(zip(clip["stories"], drops, truths)):
            story = setup.story(i)
            if k == 0 or drop:  # the shot's OWN caption, alone
                ctx, flags, shot_flag, shot_prompts = setup.first_shot(story, k)
            else:
                ctx, flags, shot_flag = (setup.truth_history(story, k) if truth
                                         else setup.own_history(clip["history"], b))
                shot_prompts = story.prompt_features[: k + 1]
            context.append(ctx)
            prompts.append(shot_prompts)
            ctx_flags.append(flags)
            shot_flags.append(shot_flag)
        stats, shot = setup.train_step(step, context, prompts, ctx_flags, shot_flags, gen)
        if k + 1 < cfg.shots_per_clip:  # the clip's last shot is nobody's history: skip its decode
            clip["history"] = clip["history"] + [setup.to_frames(shot)]
        clip["shot"] = k + 1
        return {**stats, "shot": k}

    summary = train_loop(cfg, dist, setup.modules, setup.optimizers, step_fn, desc="stage4 dmd",
                         extra_state=clip, sampler=setup.preset.sampler)
    if dist.is_main:
        summary["student"] = str(setup.export(setup.export_lora() if cfg.lora_rank > 0 else None))
        mark_done(out, **summary)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(train, Stage4Config, argv)


if __name__ == "__main__":
    main()
