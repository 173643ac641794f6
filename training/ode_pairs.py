"""ODE pairs for stage 2: teacher trajectories saved at the student's few-step times.

    python -m training.ode_pairs --config training/configs/tiny-ode.yaml

For each (story, shot k) target the teacher samples 50 Euler steps (shift 8, CFG against the empty
negative prompt) from fresh noise, with the shot's ground-truth history as context. The latents at the
student's warped times (1000, 957.93, 888.89, 737.59: grid steps 0, 13, 25, 37) and the final x0 are saved
as safetensors shards with the context, the frame flags and prompt ids; prompts stay in the latent store,
referenced by (story index, shot).

guidance_check: before generating, a few training-split targets (the last ones of the latent store; never
the evaluation split) are sampled at each listed CFG scale, decoded and scored with the Story World
analyser (adherence of the generated shot); the best scale is used and written to OUT/guidance.json.

opening_filter (off in the recipe): each teacher sample is decoded and kept only if the analyser sees no
cut at its frame 1, the jump that makes the student's spurious openings (docs/EXPERIMENTS.md, "The opening
frame"). num_pairs then counts the targets sampled; the pairs stored are those kept.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shotstream_core.config import get_preset
from shotstream_core.files import save_tensors
from shotstream_core.model import WanDiT
from shotstream_core.schedule import FlowSchedule
from shotstream_core.teacher import sample_teacher

from .common import (StageConfig, clear_pause, load_dit, mark_done, pause_stage, preset_for_weights, run_stage,
                     save_config, step_generator)
from .data import LatentStoryDataset, fit_shot


@dataclass
class ODEConfig(StageConfig):
    out_dir: str = "runs/tiny/ode"
    latent_dir: str = "runs/tiny/latents"
    teacher_path: str = "runs/tiny/teacher/teacher.safetensors"
    vae_path: str = "runs/tiny/decoder/vae.safetensors"
    num_pairs: int = 0  # targets to generate (0 = every (story, shot) of the latent store)
    batch_size: int = 32
    shard_size: int = 256
    steps: int = 50
    guidance: float = 6.0  # the reference's scale; replaced by the check's pick when guidance_check is set
    guidance_check: tuple[float, ...] = ()
    history_guidance: float = 1.0  # the teacher's history guidance (shotstream_core.teacher; 1: off, the recipe)
    check_targets: int = 12  # (story, shot) targets of the check, taken from the END of the latent store
    opening_filter: bool = False  # keep only samples that open without a cut (needs vae_path)

    def lengthens_exactly(self) -> bool:
        return False  # its length is num_pairs, in whole shards: a finished run does not grow


def target_inputs(ds: LatentStoryDataset, targets, context_frames: int, text_len: int):
    """Ground-truth history, flags, prompt ids and text of targets, without dropout."""
    from .stage1_teacher import make_batch

    return make_batch(ds, targets, context_frames, text_len)


@torch.no_grad()
def sample_targets(teacher, ds, targets, preset, guidance: float, steps: int, seed: int, device, save_at=(),
                   history_guidance: float = 1.0):
    """Teacher samples of (story, shot) targets -> (x0 [B, C, F, h, w], {t: x_t}, batch)."""
    sampler = preset.sampler
    batch = target_inputs(ds, targets, sampler.context_frames, preset.dit.text_len)
    g = step_generator(seed, 0, 0, stream=7)
    noise = torch.randn(batch.x0.shape, generator=g)
    x0, saved = sample_teacher(teacher, batch.context.to(device), noise.to(device), batch.text.to(device),
                               batch.flags.to(device), batch.prompt_ids.to(device), batch.negative.to(device),
                               steps=steps, guidance=guidance, shift=sampler.shift, save_at=save_at,
                               history_guidance=history_guidance,
                               num_train_timesteps=sampler.num_train_timesteps, shot_phase=sampler.rope_shot_phase)
    return x0.cpu(), {t: v.cpu() for t, v in saved.items()}, batch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> [F, H, W, 3] uint8."""
    return ((video.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


@torch.no_grad()
def decode_shots(x0: torch.Tensor, vae) -> list[np.ndarray]:
    """Latent shots [B, C, F, h, w] -> B decoded shots, each [F', H, W, 3] uint8."""
    return [to_uint8(v) for v in vae.decode(x0.to(vae.device)).float().cpu()]


def opens_cleanly(shots: list[np.ndarray]) -> list[bool]:
    """Per decoded shot (uint8 [F, H, W, 3]): True when the analyser sees no cut at frame 1 (what the
    evaluation counts as a spurious opening when it is a video's first shot)."""
    from .storyworld.analyse import detect_cuts

    return [1 not in detect_cuts(f) for f in shots]


def truth_path(story: dict) -> Path:
    """The Story World's NAME.truth.json beside a pre-encoded story's caption JSON (own data has none)."""
    return Path(str(story["json_path"])[: -len(".json")] + ".truth.json")


def shot_adherence(ds, targets, shots: list[np.ndarray]) -> list[float]:
    """Analyser adherence of each generated shot k (decoded, uint8 [F, H, W, 3]), scored inside its story
    after the ground-truth pixels of shots 0..k-1 (read back from the training video)."""
    import dataclasses

    from .storyworld.analyse import score_story
    from .storyworld.storage import read_story_clip, read_truth

    out = []
    for (i, k), shot in zip(targets, shots):
        meta = ds.stories[i]
        story, _, _ = read_truth(truth_path(meta))
        clip = read_story_clip(meta["video_path"], meta["json_path"], meta["ranges"])
        frames = [fit_shot(clip.shot(j), meta["frames_per_shot"][j]) for j in range(k)] + [shot]  # as pre-encoded
        ranges, pos = [], 0
        for f in frames:
            ranges.append((pos, pos + len(f)))
            pos += len(f)
        sub = dataclasses.replace(story, shots=story.shots[: k + 1])
        score = score_story(sub, np.concatenate(frames), ranges)
        out.append(score.adherence(slice(k, k + 1)))
    return out


def check_guidance(teacher, ds, preset, scales, n_targets: int, vae, device, steps: int, seed: int) -> dict:
    targets = ds.targets[-n_targets:]
    result = {}
    for s in scales:
        x0, _, _ = sample_targets(teacher, ds, targets, preset, s, steps, seed, device)
        result[float(s)] = float(np.mean(shot_adherence(ds, targets, decode_shots(x0, vae))))
        print(f"guidance {s}: adherence {result[float(s)]:.3f}", flush=True)
    return result


@torch.no_grad()
def teacher_sheet(teacher, ds, vae_path, path, n: int, guidance: float, steps: int, preset, seed: int = 0):
    """Contact sheet: per row one target shot, ground truth (top) and teacher sample (bottom), 5 frames."""
    from PIL import Image

    from shotstream_core.vae import load_vae

    vae = load_vae(vae_path)
    stride = max(1, len(ds.targets) // n)
    targets = [ds.targets[j] for j in range(0, stride * n, stride)][:n]
    x0, _, batch = sample_targets(teacher, ds, targets, preset, guidance, steps, seed, next(teacher.parameters()).device)
    gen = vae.decode(x0)
    gt = vae.decode(batch.x0)
    idx = np.linspace(0, gen.shape[2] - 1, 5).round().astype(int)
    rows = []
    for a, b in zip(gt, gen):
        rows.append(np.concatenate(list(to_uint8(a)[idx]), axis=1))  # each video converted once
        rows.append(np.concatenate(list(to_uint8(b)[idx]), axis=1))
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(path)
    return path


def check_grid(steps: int, student_t: list[float], sampler) -> None:
    """Each of the student's times must fall on a step of its own of the teacher's `steps`-step grid (the
    trajectory is saved there); the reference's 50 steps hold them exactly."""
    from shotstream_core.teacher import teacher_sigmas

    def nearest(n):
        grid = teacher_sigmas(n, sampler.shift)[:-1] * sampler.num_train_timesteps
        return [int((grid - t).abs().argmin()) for t in student_t]

    if len(set(nearest(steps))) < len(student_t):
        fits = next(n for n in range(steps + 1, 100 * len(student_t) + steps) if len(set(nearest(n))) == len(student_t))
        raise ValueError(f"steps {steps}: the teacher's grid is too coarse for the student's times "
                         f"{[round(t, 1) for t in student_t]} (two fall on one step); use at least {fits} "
                         f"steps (50, the reference's, holds each exactly)")


def generate(cfg: ODEConfig, dist) -> dict:
    """Sample the teacher on every target and store the trajectory latents at the student's times."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preset = get_preset(cfg.preset)
    sampler = preset.sampler
    schedule = FlowSchedule(sampler.num_train_timesteps, sampler.shift)
    student_t = [float(t) for t in schedule.warp(sampler.denoising_steps)]
    check_grid(cfg.steps, student_t, sampler)
    ds = LatentStoryDataset(cfg.latent_dir)
    if cfg.guidance_check:
        no_truth = [s["json_path"] for s in ds.stories if not truth_path(s).is_file()]
        if no_truth:
            raise ValueError(f"guidance_check scores teacher samples against the Story World's truth files "
                             f"(NAME.truth.json beside each caption JSON), which {no_truth[0]} and "
                             f"{len(no_truth) - 1} more lack: on your own data set guidance_check: [] and "
                             f"guidance to the scale you want")
    teacher = load_dit(cfg.teacher_path, WanDiT, "teacher (stage 1)", dist.device, frozen=True)
    preset = preset_for_weights(preset, teacher.config, cfg.teacher_path)
    ds.check_fits(preset, f"the teacher {cfg.teacher_path}")
    if dist.is_main:
        save_config(cfg, out / "config.yaml")

    guidance = cfg.guidance
    gpath = out / "guidance.json"
    if cfg.guidance_check:
        if dist.is_main and not gpath.is_file():  # rank 0 checks; the others read its pick
            from shotstream_core.vae import load_vae

            scores = check_guidance(teacher, ds, preset, cfg.guidance_check, cfg.check_targets,
                                    load_vae(cfg.vae_path, device=dist.device), dist.device, cfg.steps, cfg.seed)
            pick = max(scores, key=lambda s: (scores[s], -s))
            gpath.write_text(json.dumps({"guidance": pick, "adherence_by_scale": scores}, indent=2))
        dist.barrier()
        guidance = json.loads(gpath.read_text())["guidance"]

    opening_vae = None
    if cfg.opening_filter:
        from shotstream_core.vae import load_vae

        opening_vae = load_vae(cfg.vae_path, device=dist.device)

    targets = ds.targets if cfg.num_pairs <= 0 else ds.targets[: cfg.num_pairs]
    shards = [targets[i:i + cfg.shard_size] for i in range(0, len(targets), cfg.shard_size)]
    prev_path = out / "progress.json"
    prev = json.loads(prev_path.read_text())["elapsed_s"] if prev_path.is_file() else 0.0
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    clear_pause(out, dist.is_main)
    stopped = False
    for n, shard in enumerate(shards):
        if n % dist.world_size != dist.rank:
            continue
        path = out / f"pairs_{n:04d}.safetensors"
        if path.is_file():
            continue
        parts = {k: [] for k in ("latents", "context", "flags", "prompt_ids", "target")}
        for j in range(0, len(shard), cfg.batch_size):
            if time.perf_counter() - t0 > budget:  # this sitting's budget
                stopped = True
                break
            part = shard[j:j + cfg.batch_size]
            x0, saved, batch = sample_targets(teacher, ds, part, preset, guidance, cfg.steps,
                                              cfg.seed * 100003 + n * 1009 + j, dist.device, save_at=student_t,
                                              history_guidance=cfg.history_guidance)
            levels = [saved[t] for t in student_t] + [x0]
            keep = torch.ones(len(part), dtype=torch.bool)
            if opening_vae is not None:
                keep = torch.tensor(opens_cleanly(decode_shots(x0, opening_vae)))
            parts["latents"].append(torch.stack(levels, dim=1)[keep])  # [B, 5, C, F, h, w]
            parts["context"].append(batch.context[keep])
            parts["flags"].append(batch.flags[keep])
            parts["prompt_ids"].append(batch.prompt_ids[keep])
            parts["target"].append(torch.tensor(part, dtype=torch.long)[keep])
        if stopped:  # a shard is written whole or not at all: a partial one would be skipped on resume
            break
        tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
        tensors["timesteps"] = torch.tensor(student_t + [0.0])
        save_tensors(tensors, path, metadata={"guidance": str(guidance), "steps": str(cfg.steps)})  # whole or not at all
        if dist.is_main:
            prev_path.write_text(json.dumps({"elapsed_s": prev + time.perf_counter() - t0}))
            print(f"pairs shard {n + 1}/{len(shards)}: {len(tensors['target'])} pairs", flush=True)
    # Shards are per rank and each rank watches the clock alone: any rank that stops records why
    # (its exit ends the torchrun job); the shards written stay, the next sitting does the rest.
    if stopped:
        raise pause_stage(out, f"ode pairs stopped in shard {n + 1} of {len(shards)}: this sitting's time budget "
                               f"(max_minutes={cfg.max_minutes:g}) ran out. Run the same command again to go on "
                               f"(finished shards are kept)")
    dist.barrier()
    summary = {}
    if dist.is_main:
        count = 0
        for p in sorted(out.glob("pairs_*.safetensors")):
            with safe_open(str(p), framework="pt") as f:  # the header's shape: no latents read
                count += f.get_slice("target").get_shape()[0]
        summary = {"pairs": count, "guidance": guidance, "student_timesteps": student_t,
                   "wall_s": prev + time.perf_counter() - t0, "stop_reason": "done"}
        if cfg.opening_filter:
            summary["sampled"] = len(targets)  # every shard is written whole, so all were sampled
        mark_done(out, **summary)
        print(json.dumps(summary), flush=True)
    dist.barrier()
    return summary


class ODEPairs:
    """All stored pairs: latents [N, 5, C, F, h, w] (levels at `timesteps`), context, flags, prompt ids,
    target (story index, shot) into the latent store."""

    def __init__(self, ode_dir):
        files = sorted(Path(ode_dir).glob("pairs_*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no ODE pairs in {ode_dir} (run python -m training.ode_pairs)")
        parts = [load_file(str(p)) for p in files]
        for key in ("latents", "context", "flags", "prompt_ids", "target"):
            setattr(self, key, torch.cat([p[key] for p in parts]))
        self.timesteps = parts[0]["timesteps"]
        if len(self.target) == 0:
            raise ValueError(f"the ODE pairs in {ode_dir} are empty: opening_filter dropped every sample. Sample "
                             f"more targets (num_pairs) or turn opening_filter off")

    def __len__(self) -> int:
        return self.latents.shape[0]


def main(argv=None):
    return run_stage(generate, ODEConfig, argv)


if __name__ == "__main__":
    main()
