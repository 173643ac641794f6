"""Evaluate a model on the Story World's evaluation split and write the ablation report.

    python -m training.evaluate --model tiny --out eval/                   # the full table
    python -m training.evaluate --model tiny --out /tmp/ev --quick          # 2 stories: a smoke run
    python -m training.evaluate --model tiny --out shotstream_core/weights/tiny/eval   # the shipped report

One run = for every variant (a row of the ablation table, story-world.md):
  evaluation split (5-shot stories, and 10-shot stories for drift) -> generate every story shot by shot
  (fixed noise seeds per story, the same for every variant) -> one mp4 per story -> Story World analyser
  -> metrics.json + report.md + PNG plots in --out.

Rows: the causal student; the same with the global cache emptied every shot (engine.use_history = False);
the same with the RoPE shot indicator off (engine.shot_phase = 0); the student after stage 3 only; the
bidirectional teacher (50 Euler steps, CFG) in a story loop built from the engine's own pieces; and the
ground-truth renders (the analyser's ceiling). Opt-in, outside the issue's table (`--variants ...
truth_opening truth_opening_no_history teacher_truth_opening`): the student going on from each story's true
shot 1, given as footage (engine.add_footage), with and without its global cache, and the teacher.
The metric definitions live in training.storyworld.analyse.
Timings are wall-clock seconds of generation only (not mp4 writing or scoring), measured in this run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from shotstream_core.config import get_preset
from shotstream_core.context import plan_context
from shotstream_core.engine import BlockOutput, ShotRequest, ShotStream, ShotStreamEngine
from shotstream_core.loading import (BUNDLED_DIR, ModelLoadError, build_dit, fingerprint, load_dit_state,
                                     load_engine, sampler_for_dit)
from shotstream_core.model import CausalWanDiT
from shotstream_core.state import ShotRecord, StoryState
from shotstream_core.teacher import sample_teacher
from shotstream_core.vae import StreamingDecoder
from shotstream_core.video import VideoWriter, to_uint8 as frames_to_uint8  # not ode_pairs.to_uint8 (decoder output)
from training.common import describe_dit
from training.dmd import uncond_like
from training.ode_pairs import to_uint8
from training.storyworld.analyse import aggregate, score_story
from training.storyworld.render import render_shot, render_story
from training.storyworld.storage import read_mp4
from training.storyworld.world import DEV_START, EVAL_SEED, Story, make_split

# --- the rows of the ablation table -----------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    weights: str | None  # file in the weights folder; None = no model (ground truth)
    use_history: bool = True
    shot_phase_off: bool = False
    teacher: bool = False
    through_vae: bool = False  # ground truth encoded and decoded by the shipped VAE
    truth_opening: bool = False  # shot 1 is the ground-truth render, given as footage (engine.add_footage)


VARIANTS = {v.key: v for v in (
    Variant("student", "causal student (full)", "dit"),
    Variant("no_history", "student, global cache emptied every shot", "dit", use_history=False),
    Variant("no_shot_phase", "student, RoPE shot indicator off", "dit", shot_phase_off=True),
    Variant("stage3", "student after stage 3 only", "student_stage3"),
    Variant("teacher", "bidirectional teacher (Euler, CFG)", "teacher", teacher=True),
    Variant("truth", "ground-truth renders (analyser ceiling)", None),
    Variant("truth_vae", "ground truth through the shipped VAE (ceiling of any model using it)", None,
            through_vae=True),
    # Not in the table: the student going on from a true shot 1, as from a user's footage. Memory then
    # asks only whether the cache carries what shot 1 showed, not also whether the student drew it.
    Variant("truth_opening", "student after a ground-truth shot 1 given as footage (adherence counts that shot)",
            "dit", truth_opening=True),
    Variant("truth_opening_no_history", "the same, global cache emptied every shot", "dit", use_history=False,
            truth_opening=True),
    Variant("teacher_truth_opening", "teacher after a ground-truth shot 1 given as footage", "teacher",
            teacher=True, truth_opening=True),
)}
DEFAULT_VARIANTS = tuple(k for k, v in VARIANTS.items() if not v.truth_opening)

# The acceptance targets for the shipped student (issue 6, acceptance 3): metric -> least value.
TARGETS = {"adherence": 0.90, "memory": 0.90, "cut_f1": 0.95, "drift": -0.05}
METRIC_COLUMNS = ("adherence", "memory", "cut_f1", "drift", "flicker", "sec_per_frame", "time_to_first_frame")


@dataclass
class EvalConfig:
    model: str = "tiny"
    out: Path = Path("eval")
    stories: int = 40  # 5-shot evaluation stories
    stories10: int = 20  # 10-shot evaluation stories (drift)
    teacher_stories: int = 10  # the teacher costs steps x 2 (CFG) full passes per shot: fewer stories
    teacher_stories10: int = 5
    teacher_steps: int = 50
    guidance: float = 6.0
    history_guidance: float = 1.0  # the teacher rows' history guidance (shotstream_core.teacher; 1: off)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    weights_dir: Path | None = None  # default: shotstream_core/weights/<model>
    device: str = "cpu"
    threads: int = 1  # torch CPU threads; 0 = torch's default. One thread is far faster on a shared
    # 2-core machine (two spinning threads per process fight every other job) and costs little on a tiny model.
    crf: int = 12  # the Story World's own mp4 quality, so the analyser reads what it was validated on
    quick: bool = False
    split: str = "eval"  # "dev" for experiments: the evaluation split is for the final report only
    noise_seed: int = 0  # 0: the split's fixed noise; others draw other noise for the same stories, so a
    # comparison can be repeated over several (the closed loop turns tiny changes into visibly other stories)

    def __post_init__(self):
        self.out = Path(self.out)
        self.weights_dir = Path(self.weights_dir) if self.weights_dir else BUNDLED_DIR / self.model
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
        for name in ("stories", "stories10", "teacher_stories", "teacher_stories10"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.stories + self.stories10 == 0:
            raise ValueError("nothing to evaluate: give --stories and/or --stories10 > 0")
        if self.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.teacher_steps < 1:
            raise ValueError(f"--teacher-steps must be >= 1, got {self.teacher_steps}")
        if self.split not in ("eval", "dev"):
            raise ValueError(f"--split must be eval or dev, got {self.split!r}")
        if self.noise_seed < 0:
            raise ValueError(f"--noise-seed must be >= 0 (0 = the split's fixed noise), got {self.noise_seed}")


# --- the evaluation split -----------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalStory:
    name: str  # file stem of its videos, e.g. s5_003
    story: Story
    seeds: tuple[int, ...]  # noise seed of every shot: fixed, the same for every variant


def shot_seeds(story: Story, index: int, noise_seed: int = 0) -> tuple[int, ...]:
    """Per-shot noise seeds from the story's own seed (or its index) and the run's noise seed: every variant
    draws the same noise. Noise seed 0 keeps the seeds every committed report was made with."""
    base = story.seed if story.seed is not None else index
    entropy = [EVAL_SEED, int(base)] + ([int(noise_seed)] if noise_seed else [])
    state = np.random.SeedSequence(entropy).generate_state(story.num_shots, dtype=np.uint64)
    return tuple(int(s) & (2**63 - 1) for s in state)


# The 10-shot development stories start this far after the 5-shot ones, so the two sets share no story seed.
DEV10_OFFSET = 50_000


def split_stories(split: str, shots: int, n: int, aspect: float) -> list[Story]:
    """The first n `shots`-shot stories of the evaluation split ("eval": the Story World's held-out seed,
    never trained on, for the report) or of the development split ("dev": training-split stories from
    DEV_START on, which no training set reaches; experiments and recipe choices are measured there)."""
    if split == "eval":
        return make_split(f"eval{shots}", n, aspect=aspect)
    start = DEV_START + (DEV10_OFFSET if shots == 10 else 0)
    return make_split("train", n, num_shots=shots, start=start, aspect=aspect)


def evaluation_split(n5: int, n10: int, aspect: float, split: str = "eval",
                     noise_seed: int = 0) -> list[EvalStory]:
    """n5 five-shot and n10 ten-shot stories of `split` ("eval" or "dev"), with their noise seeds."""
    out = []
    for shots, n, tag in ((5, n5, "s5"), (10, n10, "s10")):
        for i, story in enumerate(split_stories(split, shots, n, aspect) if n else []):
            out.append(EvalStory(f"{tag}_{i:03d}", story, shot_seeds(story, i, noise_seed)))
    return out


# --- the teacher behind the engine's shot interface ----------------------------------------------------

class TeacherStoryEngine:
    """The bidirectional teacher generating a story shot by shot, with the student's context rule.

    It borrows an engine built on the teacher's weights for everything the engine already does (context
    plan and per-frame VAE encoding of the chosen history frames, prompt features of every shot so far,
    story states); only the sampler differs: sample_teacher's Euler steps with CFG over the whole shot,
    then the shot is decoded block by block like the student's, so time to first frame is comparable.
    """

    def __init__(self, pieces: ShotStreamEngine, steps: int = 50, guidance: float = 6.0, history_guidance: float = 1.0):
        self.pieces = pieces
        self.steps, self.guidance, self.history_guidance = steps, guidance, history_guidance
        self.shot_phase = pieces.shot_phase

    def new_story(self) -> StoryState:
        return self.pieces.new_story()

    def add_footage(self, state: StoryState, frames, global_caption: str, caption: str) -> StoryState:
        return self.pieces.add_footage(state, frames, global_caption, caption)

    def stream_shot(self, state: StoryState, request: ShotRequest) -> ShotStream:
        self.pieces.check_state(state)
        stream = ShotStream(iter(()))
        stream._blocks = self._shot_blocks(state, request, stream)
        return stream

    @torch.no_grad()
    def _shot_blocks(self, state: StoryState, request: ShotRequest, stream: ShotStream):
        eng, dit = self.pieces, self.pieces.dit
        geo, sampler = state.geometry, eng.sampler
        h, w, frames_total = geo.latent_height, geo.latent_width, geo.latent_frames
        plan = plan_context([s.num_frames for s in state.shots], sampler.context_frames)
        ctx = eng._context_latents(state, plan, (h, w))  # [1, C, Fc, h, w]
        flags = torch.tensor([list(plan.flags) + [plan.shot_flag] * frames_total], device=eng.device)
        text, prompt_ids = eng.shot_text(state, request, flags)  # [1, P, S, text_dim], [1, Fc+F]
        # CFG's unconditional branch: the negative prompt in every shot's slot, as in training's DMD/ODE pairs.
        uncond = uncond_like(text, eng.prompts.get(request.negative))
        gen = torch.Generator().manual_seed(int(request.seed))  # the student's noise for the same seed
        noise = torch.randn(1, dit.config.in_channels, frames_total, h, w, generator=gen).to(eng.device)
        x0, _ = sample_teacher(dit, ctx, noise, text, flags, prompt_ids, uncond, steps=self.steps,
                               guidance=self.guidance, shift=sampler.shift,
                               num_train_timesteps=sampler.num_train_timesteps, shot_phase=self.shot_phase,
                               history_guidance=self.history_guidance)
        decoder = StreamingDecoder(eng.vae)
        decoder.reset()
        vae_dtype = next(eng.vae.parameters()).dtype
        spans = sampler.block_spans(frames_total)
        shot_frames = []
        for b, (f0, f1) in enumerate(spans):
            block = x0[:, :, f0:f1]
            pixels = decoder.feed(block.to(vae_dtype))  # [1, 3, n, H, W] in [-1, 1]
            frames = ((pixels[0].float().permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1).cpu()  # [n, H, W, 3]
            shot_frames.append(frames)
            yield BlockOutput(state.num_shots, b, len(spans), block, frames)
        decoder.finish()
        frames = torch.cat(shot_frames)
        stream.frames = frames
        stream.state = state.with_shot(ShotRecord(request.global_caption, request.caption, request.negative,
                                                  int(request.seed), plan.shot_flag,
                                                  (frames * 255).round().to(torch.uint8)))


# --- models -------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    runner: object | None  # ShotStreamEngine / TeacherStoryEngine, None when not available
    weights: str  # what was loaded, for the report
    reason: str = ""  # why not available


class ModelZoo:
    """Loads each weights file once; every variant shares the VAE and text encoder of the base engine."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.preset = get_preset(cfg.model)
        vae = cfg.weights_dir / "vae.safetensors"
        dit = cfg.weights_dir / "dit.safetensors"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning is reported per row instead
            self.base = load_engine(dit_path=dit if dit.is_file() else None, preset=cfg.model,
                                    vae_path=vae if vae.is_file() else None, device=cfg.device)
        self.vae_source = _rel(vae) if vae.is_file() else "bundled or random (no vae.safetensors)"
        self._dits: dict[str, tuple | str] = {}

    def _dit(self, name: str):
        """(state dict, config, description, sampler) of weights file `name`, or the reason it is not
        available. The sampler has the blocks the file records (a stage-3 student beside a later one)."""
        if name not in self._dits:
            path = self.cfg.weights_dir / f"{name}.safetensors"
            if path.is_file():
                try:
                    sd, dcfg = load_dit_state(path)
                    self._dits[name] = (sd, dcfg, _describe_file(path), sampler_for_dit(path, self.preset.sampler))
                except ModelLoadError as e:
                    self._dits[name] = f"{path.name} could not be loaded: {e}"
            elif name == "dit":
                # Before training has exported a student, the table still runs on the random model.
                torch.manual_seed(0)
                sd = CausalWanDiT(self.preset.dit).state_dict()
                self._dits[name] = (sd, self.preset.dit, f"RANDOM weights (no {_rel(path)})", self.preset.sampler)
            else:
                self._dits[name] = f"not available: no {path.name} in {_rel(self.cfg.weights_dir)}"
        return self._dits[name]

    def engine(self, name: str) -> tuple[ShotStreamEngine | None, str]:
        got = self._dit(name)
        if isinstance(got, str):
            return None, got
        sd, dcfg, desc, sampler = got
        if dcfg != self.base.dit.config:
            return None, (f"not available: {name}.safetensors is a {describe_dit(dcfg)} DiT, not "
                          f"{self.cfg.model}'s {describe_dit(self.base.dit.config)} one")
        dit = build_dit(sd, dcfg, self.base.dtype, self.base.device)
        preset = dataclasses.replace(self.base.preset, sampler=sampler)
        # Same VAE and text encoder as the base engine; a fresh prompt cache per variant (fair timing).
        engine = ShotStreamEngine(dit, self.base.vae, self.base.prompts.encoder, preset, fingerprint(sd, dcfg))
        return engine, desc

    def load(self, variant: Variant) -> Loaded:
        engine, desc = self.engine(variant.weights)
        if engine is None:
            return Loaded(None, "", desc)
        if variant.teacher:
            return Loaded(TeacherStoryEngine(engine, self.cfg.teacher_steps, self.cfg.guidance,
                                             self.cfg.history_guidance), desc)
        engine.use_history = variant.use_history
        if variant.shot_phase_off:
            engine.shot_phase = 0.0
        return Loaded(engine, desc)


def _describe_file(path: Path) -> str:
    return f"{path.name} ({path.stat().st_size / 2**20:.1f} MiB)"


# --- generating and scoring one story ------------------------------------------------------------------

@dataclass
class Timing:
    generation_s: float = 0.0  # wall-clock of generation only
    frames: int = 0
    first_frame_s: list[float] = field(default_factory=list)  # per shot: request -> first decoded block

    def summary(self) -> dict:
        ff = self.first_frame_s
        return {
            "sec_per_frame": self.generation_s / self.frames if self.frames else None,
            "time_to_first_frame": float(np.mean(ff)) if ff else None,
            "time_to_first_frame_median": float(np.median(ff)) if ff else None,
            "generation_s": self.generation_s, "frames": self.frames, "shots": len(ff),
        }


class _StoryVideo:
    """One story's mp4, written block by block by the engine's VideoWriter. Every row, ground truth
    included, goes through this one encoder, so codec differences never separate the rows."""

    def __init__(self, path: Path, fps: float, crf: int):
        self.blocks: list[np.ndarray] = []
        self.writer = VideoWriter(path, fps=fps, crf=crf)

    def write(self, frames) -> None:
        u8 = frames_to_uint8(frames)  # [n, H, W, 3]
        self.blocks.append(u8)
        self.writer.write(u8)

    def close(self) -> np.ndarray:
        self.writer.close()
        return np.concatenate(self.blocks)


def generate_story(runner, item: EvalStory, video: _StoryVideo, timing: Timing,
                   truth_opening: bool = False) -> list[tuple[int, int]]:
    """Every shot of the story in order, each block into `video`; returns the per-shot frame ranges.
    truth_opening: shot 1 is the story's ground-truth render, added as footage (not generated, not timed)."""
    state = runner.new_story()
    story, ranges = item.story, []
    if truth_opening:
        state = runner.add_footage(state, render_shot(story, 0, state.geometry), story.global_caption,
                                   story.shot_captions[0])
        video.write(state.shots[0].frames)
        ranges.append((0, state.shots[0].num_frames))
    for caption, seed in list(zip(story.shot_captions, item.seeds))[state.num_shots:]:
        request = ShotRequest(story.global_caption, caption, seed=seed)
        t0 = time.perf_counter()
        stream = runner.stream_shot(state, request)
        blocks = iter(stream)
        n = 0
        while True:
            t = time.perf_counter()
            block = next(blocks, None)
            timing.generation_s += time.perf_counter() - t
            if block is None:
                break
            if n == 0:
                timing.first_frame_s.append(time.perf_counter() - t0)
            video.write(block.frames)  # not timed: writing is not generation
            n += len(block.frames)
        start = ranges[-1][1] if ranges else 0
        ranges.append((start, start + n))
        timing.frames += n
        state = stream.state
    return ranges


def vae_roundtrip(vae, frames, ranges):
    """Each shot encoded as a clip and decoded: what the best possible latents would look like."""
    out = []
    for a, b in ranges:
        clip = torch.from_numpy(frames[a:b]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, F, H, W]
        video = vae.decode(vae.encode(clip.to(vae.device, vae.dtype)))[0].float()
        out.append(to_uint8(video.cpu()))
    return np.concatenate(out)


def warm_up(runner) -> None:
    """One throwaway first shot (lazy loads, allocator) so the first timed shot is not penalised."""
    stream = runner.stream_shot(runner.new_story(), ShotRequest("a red circle in the meadow.", "wide shot, the red circle, still."))
    for _ in stream:
        pass


# --- one variant ---------------------------------------------------------------------------------------

class VariantRun:
    """Scores, timing and a sample video of one row, filled story by story."""

    def __init__(self, variant: Variant, runner, loaded_weights: str, cfg: EvalConfig, geometry):
        self.variant, self.runner, self.weights = variant, runner, loaded_weights
        self.cfg, self.geometry = cfg, geometry
        self.video_dir = cfg.out / "videos" / variant.key
        self.video_dir.mkdir(parents=True, exist_ok=True)
        self.timing = Timing()
        self.scores5, self.scores10, self.sample = [], [], None
        self.wall_s = 0.0

    def story(self, item: EvalStory) -> None:
        """Generate (or render), write, read back and score one story."""
        t0 = time.perf_counter()
        path, geo = self.video_dir / f"{item.name}.mp4", self.geometry
        if self.runner is None or self.variant.through_vae:  # ground truth, through the same codec
            frames, ranges = render_story(item.story, geo)
            if self.variant.through_vae:
                frames = vae_roundtrip(self.runner, frames, ranges)
            video = _StoryVideo(path, geo.fps, self.cfg.crf)
            video.write(frames)
            frames = video.close()
        else:
            video = _StoryVideo(path, geo.fps, self.cfg.crf)
            ranges = generate_story(self.runner, item, video, self.timing, self.variant.truth_opening)
            frames = video.close()
        if self.sample is None:
            self.sample = (item.name, frames, ranges)
        decoded, _ = read_mp4(path)  # score what is on disk, as `storyworld score` would
        score = score_story(item.story, decoded, ranges)
        (self.scores10 if item.story.num_shots >= 10 else self.scores5).append(score)
        self.wall_s += time.perf_counter() - t0

    def row(self) -> dict:
        agg5 = aggregate(self.scores5) if self.scores5 else None
        agg10 = aggregate(self.scores10) if self.scores10 else None
        head = agg5 or {}  # the table's columns are the 5-shot stories' (drift aside): empty without them
        row = {
            "label": self.variant.label, "available": True, "weights": self.weights,
            "stories5": len(self.scores5), "stories10": len(self.scores10),
            "adherence": head.get("adherence"), "memory": head.get("memory"),
            "memory_stderr": head.get("memory_stderr"), "cut_f1": head.get("cut_f1"),
            "drift": agg10["drift"] if agg10 else None, "flicker": head.get("flicker"),
        }
        row.update(self.timing.summary() if self.runner is not None and not self.variant.through_vae else
                   {"sec_per_frame": None, "time_to_first_frame": None})
        row.update(eval5=agg5, eval10=agg10, adherence_by_shot=adherence_by_shot(self.scores5 + self.scores10),
                   wall_s=self.wall_s)
        if self.variant.teacher:
            row.update(teacher_steps=self.cfg.teacher_steps, guidance=self.cfg.guidance,
                       history_guidance=self.cfg.history_guidance)
        return row


def adherence_by_shot(scores) -> list[float | None]:
    """Mean adherence of shot k (0-based) over the stories that have it: the shape of drift."""
    longest = max((len(s.adherence_items) for s in scores), default=0)
    out = []
    for k in range(longest):
        vals = [s.adherence(slice(k, k + 1)) for s in scores if len(s.adherence_items) > k]
        out.append(float(np.mean(vals)) if vals else None)
    return out


# --- the whole run -----------------------------------------------------------------------------------

def run(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate every variant of cfg; writes metrics.json, report.md and plots into cfg.out.
    Grad mode and the torch thread count are restored afterwards (callers may be tests or training)."""
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            return _run(cfg, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: EvalConfig, progress: bool) -> dict:
    from training.report import write_report

    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Videos are big and regenerable: keep them out of git even when --out lies inside the package.
    (cfg.out / ".gitignore").write_text("videos/\n")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    zoo = ModelZoo(cfg)
    geometry = zoo.base.geometry  # the preset's, on the latent grid of the VAE it loaded
    aspect = geometry.width / geometry.height
    items = evaluation_split(cfg.stories, cfg.stories10, aspect, cfg.split, cfg.noise_seed)
    teacher_items = [i for i in items if i.story.num_shots < 10][: cfg.teacher_stories] + \
                    [i for i in items if i.story.num_shots >= 10][: cfg.teacher_stories10]

    rows, runs = {}, {}
    for key in cfg.variants:
        variant = VARIANTS[key]
        if variant.through_vae:
            loaded = Loaded(zoo.base.vae, zoo.vae_source)
        else:
            loaded = Loaded(None, "renderer") if variant.weights is None else zoo.load(variant)
        if variant.weights is not None and loaded.runner is None:
            rows[key] = {"label": variant.label, "available": False, "reason": loaded.reason}
            print(f"[evaluate] {key}: {loaded.reason}", file=sys.stderr)
        elif variant.teacher and not teacher_items:
            rows[key] = {"label": variant.label, "available": False,
                         "reason": "not run: no stories requested (--teacher-stories 0)"}
        else:
            rows[key] = None  # keeps the table's row order
            runs[key] = VariantRun(variant, loaded.runner, loaded.weights, cfg, geometry)
            if loaded.runner is not None and not variant.through_vae:
                warm_up(loaded.runner)

    # Story by story, every row in turn: a slow patch of a shared machine hits all rows alike.
    teacher_names = {i.name for i in teacher_items}
    it = items
    if progress:
        from tqdm import tqdm
        it = tqdm(items, desc="stories", file=sys.stderr)
    for item in it:
        for key, vr in runs.items():
            if not vr.variant.teacher or item.name in teacher_names:
                vr.story(item)
    for key, vr in runs.items():
        rows[key] = vr.row()
        runner = vr.runner.pieces if isinstance(vr.runner, TeacherStoryEngine) else vr.runner
        rows[key]["model_id"] = getattr(runner, "model_id", None)
        print(f"[evaluate] {key}: " + ", ".join(f"{c} {_fmt(rows[key].get(c))}" for c in METRIC_COLUMNS),
              file=sys.stderr)
    samples = {key: vr.sample for key, vr in runs.items()}
    if rows.get("stage3", {}).get("available") and rows.get("student", {}).get("available") and \
            rows["stage3"]["model_id"] == rows["student"]["model_id"]:
        rows["stage3"]["note"] = "the same weights as the student (stage 4 has not been exported yet)"

    metrics = {
        "model": cfg.model,
        "weights_dir": _rel(cfg.weights_dir),
        "vae": zoo.vae_source,
        "split": {"name": cfg.split, "seed": EVAL_SEED if cfg.split == "eval" else None,
                  "dev_start": DEV_START if cfg.split == "dev" else None, "noise_seed": cfg.noise_seed,
                  "stories5": cfg.stories, "stories10": cfg.stories10,
                  "teacher_stories5": min(cfg.teacher_stories, cfg.stories),
                  "teacher_stories10": min(cfg.teacher_stories10, cfg.stories10),
                  "geometry": dataclasses.asdict(geometry)},
        "columns": list(METRIC_COLUMNS),
        "targets": TARGETS,
        "variants": rows,
        "machine": {"platform": platform.platform(), "device": str(zoo.base.device),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "command": command_line(cfg),
        "run_wall_s": time.perf_counter() - started,
        "quick": cfg.quick,
    }
    if "student" in rows and rows["student"].get("available"):
        metrics["target_check"] = check_targets(rows["student"])
    (cfg.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
    write_report(metrics, cfg.out, samples)
    return metrics


def check_targets(row: dict) -> dict:
    """metric -> {value, target, met, short_by} for the issue's acceptance targets."""
    out = {}
    for k, target in TARGETS.items():
        v = row.get(k)
        out[k] = {"value": v, "target": target, "met": v is not None and v >= target,
                  "short_by": None if v is None else max(0.0, target - v)}
    return out


def command_line(cfg: EvalConfig) -> str:
    parts = ["python -m training.evaluate", f"--model {cfg.model}", f"--out {_rel(cfg.out)}"]
    if cfg.quick:
        parts.append("--quick")
    # the sizes always: a --quick run may have set some of its own
    parts += [f"--stories {cfg.stories}", f"--stories10 {cfg.stories10}",
              f"--teacher-stories {cfg.teacher_stories}", f"--teacher-stories10 {cfg.teacher_stories10}"]
    defaults = EvalConfig(model=cfg.model, out=cfg.out)
    if cfg.variants != defaults.variants:
        parts.append(f"--variants {' '.join(cfg.variants)}")
    if cfg.device != defaults.device:
        parts.append(f"--device {cfg.device}")
    if cfg.teacher_steps != defaults.teacher_steps:
        parts.append(f"--teacher-steps {cfg.teacher_steps}")
    if cfg.guidance != defaults.guidance:  # the teacher row depends on it
        parts.append(f"--guidance {cfg.guidance:g}")
    if cfg.history_guidance != defaults.history_guidance:
        parts.append(f"--history-guidance {cfg.history_guidance:g}")
    if cfg.threads != defaults.threads:  # the timing columns depend on it
        parts.append(f"--threads {cfg.threads}")
    if cfg.weights_dir != BUNDLED_DIR / cfg.model:
        parts.append(f"--weights-dir {_rel(cfg.weights_dir)}")
    if cfg.split != defaults.split:
        parts.append(f"--split {cfg.split}")
    if cfg.noise_seed != defaults.noise_seed:
        parts.append(f"--noise-seed {cfg.noise_seed}")
    return " ".join(parts)


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- CLI -------------------------------------------------------------------------------------------

QUICK = dict(stories=2, stories10=1, teacher_stories=1, teacher_stories10=0)


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = EvalConfig()
    p.add_argument("--model", default=d.model, help="preset whose bundled weights to evaluate (default: tiny)")
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json, report.md, plots, videos/")
    p.add_argument("--stories", type=int, default=None, help=f"5-shot evaluation stories (default {d.stories})")
    p.add_argument("--stories10", type=int, default=None, help=f"10-shot stories for drift (default {d.stories10})")
    p.add_argument("--teacher-stories", type=int, default=None,
                   help=f"5-shot stories for the slow teacher row (default {d.teacher_stories})")
    p.add_argument("--teacher-stories10", type=int, default=None,
                   help=f"10-shot stories for the teacher row (default {d.teacher_stories10})")
    p.add_argument("--teacher-steps", type=int, default=d.teacher_steps)
    p.add_argument("--guidance", type=float, default=d.guidance, help="teacher CFG scale")
    p.add_argument("--history-guidance", type=float, default=d.history_guidance,
                   help="teacher history guidance (1: off, the default)")
    p.add_argument("--variants", nargs="+", default=list(d.variants), choices=list(VARIANTS),
                   help="rows to evaluate (default: all)")
    p.add_argument("--weights-dir", type=Path, default=None,
                   help="folder with dit / student_stage3 / teacher / vae .safetensors "
                        "(default shotstream_core/weights/<model>)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch CPU threads (default 1: fastest on a shared machine; 0 = torch's default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 five-shot + 1 ten-shot story, teacher on 1")
    p.add_argument("--split", choices=("eval", "dev"), default=d.split,
                   help="eval: the held-out evaluation stories, for the final report (default); dev: "
                        "development stories from the training seed that no training set reaches, for experiments")
    p.add_argument("--noise-seed", type=int, default=d.noise_seed,
                   help="0: the split's fixed noise (default); N > 0: other noise for the same stories, to repeat "
                        "a comparison over several seeds (python -m training.compare_evals)")
    a = p.parse_args(argv)
    sizes = dict(QUICK) if a.quick else {}
    for k in ("stories", "stories10", "teacher_stories", "teacher_stories10"):
        if getattr(a, k) is not None:
            sizes[k] = getattr(a, k)
    try:
        return EvalConfig(model=a.model, out=a.out, teacher_steps=a.teacher_steps, guidance=a.guidance,
                          history_guidance=a.history_guidance,
                          variants=tuple(dict.fromkeys(a.variants)), weights_dir=a.weights_dir,
                          device=a.device, threads=a.threads, quick=a.quick, split=a.split,
                          noise_seed=a.noise_seed, **sizes)
    except ValueError as e:
        p.error(str(e))


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    metrics = run(cfg)
    print(f"wrote {cfg.out / 'metrics.json'} and {cfg.out / 'report.md'}")
    return metrics


if __name__ == "__main__":
    main()
