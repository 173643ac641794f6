"""Training data: the Story World training set on disk, pixel shots for the VAE, pre-encoded latent stories.

On disk (runs/<preset>/data) the stories are in the reference's format (index.csv + JSON captions + mp4)
and are read back through the general clip reader, exactly as a user's real data would be.

Pre-encoded stories (runs/<preset>/latents, written by training.preencode) are safetensors shards:
    shard_XXXX.safetensors   "<story>/shot<i>"       [C, F, h, w]  the shot encoded as a clip
                             "<story>/frames<i>"     [M, C, h, w]  pixel frames encoded alone
                             "<story>/frame_idx<i>"  [M]           which pixel frames those are
                             "<story>/detail<i>"     [F, h, w]     pixel detail per latent cell (training.detail)
                             "<story>/prompt<i>"     [L, text_dim] features of the shot's prompt
    negative.safetensors     "negative"              [L, text_dim] the empty negative prompt
    index.json               per story: name, shard, ranges, frames per shot, captions, prompts
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from shotstream_core.config import ShotGeometry
from shotstream_core.context import plan_context
from shotstream_core.model import prompt_ids_from_flags


# --- the Story World training set ------------------------------------------------------------------

def write_training_set(out_dir, num_stories: int, geometry: ShotGeometry, min_shots: int = 2,
                       max_shots: int = 4, progress: bool = False) -> Path:
    """Render the stories into out_dir in the reference's format; returns index.csv."""
    from .storyworld.storage import write_stories
    from .storyworld.world import training_stories

    return write_stories(training_stories(num_stories, min_shots, max_shots), out_dir, geometry,
                         progress=progress)


def folder_digest(folder, skip=("done.json", "built_from.json")) -> str:
    """A hash of what a data set holds: every file under folder by name, an mp4 by its decoded frames (its
    bytes carry the muxer's and encoder's version strings), any other file by its bytes; the run records
    in `skip` left out. A set rendered again by changed generator code, with the same counts, reads as
    another; the same stories written again by another FFmpeg build, as the same (where its frames are)."""
    from .storyworld.storage import read_mp4

    h = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        if path.suffix.lower() == ".mp4":
            h.update(read_mp4(path)[0].tobytes())
        else:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()[:16]


def read_clips(data_dir, limit: int | None = None, geometry: ShotGeometry | None = None):
    """(record, StoryClip) of the first `limit` stories of data_dir/index.csv, resized to the geometry."""
    from .storyworld.storage import read_index

    records = read_index(Path(data_dir))
    size = (geometry.height, geometry.width) if geometry is not None else None
    if geometry is not None and records:
        note_fitting(records[0], geometry)
    for rec in records[:limit]:
        yield rec, rec.read(size=size)


def note_fitting(rec, geometry: ShotGeometry) -> None:
    """Say, once, when a data set's videos (judged by its first) are fitted to the preset with a change
    a user may not expect: another aspect ratio (frames are resized, not cropped), another frame rate
    (each shot is sampled to frames_per_shot whatever its length, so a long shot plays faster)."""
    import av

    try:
        with av.open(str(rec.video_path)) as container:
            stream = container.streams.video[0]
            width, height = stream.width, stream.height
            fps = float(stream.average_rate or stream.base_rate or 0)
    except (OSError, av.error.FFmpegError, IndexError):
        return  # an unreadable video is reported, with its row, when it is read
    target = geometry.width / geometry.height
    notes = []
    if width and height and abs(width / height - target) > 0.02 * target:
        notes.append(f"{rec.video_path.name}: {width}x{height} frames are resized to the preset's "
                     f"{geometry.width}x{geometry.height} without cropping, which changes their aspect ratio; "
                     f"crop the videos to {geometry.width}:{geometry.height} first to keep it")
    if fps and abs(fps - geometry.fps) > 0.5:
        notes.append(f"{rec.video_path.name}: {fps:g} fps; each shot is sampled evenly to the preset's "
                     f"{geometry.frames_per_shot} frames whatever its length, and played at {geometry.fps} fps")
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)


def fit_shot(frames: np.ndarray, n: int) -> np.ndarray:
    """A shot's frames [F, ...] at n frames: a longer shot subsampled evenly over its whole length (a 10 s
    real shot stays the whole 10 s). The reference differs: it takes every (F // n)-th frame and keeps the
    first n, so a shot under twice n keeps its start at native speed and loses its end (training/README.md)."""
    return frames[np.linspace(0, len(frames) - 1, n).round().astype(int)]


def shot_frames(clip, geometry: ShotGeometry) -> list[np.ndarray]:
    """The clip's shots at the geometry's frames per shot (4k+1), by fit_shot; a shorter one is an error."""
    out = []
    n = geometry.frames_per_shot
    source = getattr(clip, "source", "")
    for k in range(clip.num_shots):
        frames = clip.shot(k)
        if len(frames) < n:
            raise ValueError(
                f"{source + ': ' if source else ''}shot {k + 1} (caption key shot{k + 1}) has {len(frames)} "
                f"frames; the preset needs {n} per shot: drop shots shorter than {n} frames from index.csv "
                f"(their range in frame_number, renumbering the caption JSON's shot keys to match), or use "
                f"a preset with shorter shots (Story World data: write it again for this preset)")
        out.append(fit_shot(frames, n))
    return out


def load_shot_frames(data_dir, num_stories: int, geometry: ShotGeometry) -> torch.Tensor:
    """Every shot of the first num_stories stories: uint8 [S, F, H, W, 3] (for the VAE)."""
    shots = [s for _, clip in read_clips(data_dir, num_stories, geometry) for s in shot_frames(clip, geometry)]
    if not shots:
        raise ValueError(f"no shots found in {data_dir}; write the training set first (training.pipeline)")
    return torch.from_numpy(np.stack(shots))


# --- history (global context) from ground-truth frames -----------------------------------------------

def history_inputs(frame_latents_of_earlier_shots, frames_per_shot, context_frames: int = 6,
                   latent_shape=None):
    """Global context of the next shot from its earlier shots' per-frame latents, by the reference rule.

    frame_latents_of_earlier_shots: list of [N_i, C, h, w] (every pixel frame of shot i encoded alone;
    rows never picked by the rule may be missing, see LatentStoryDataset); frames_per_shot: N_i.
    Returns (context [C, Fc, h, w], flags: Fc context flags followed by the new shot's flag).
    The first shot (no history) gets Fc all-zero latents with flag 0; latent_shape (C, h, w) is then needed.
    """
    plan = plan_context(list(frames_per_shot), context_frames)
    if plan.zero_context:
        if latent_shape is None:
            if not frame_latents_of_earlier_shots:
                raise ValueError("the first shot has no history: pass latent_shape=(C, h, w) for its zero context")
            latent_shape = frame_latents_of_earlier_shots[0].shape[1:]
        c, h, w = latent_shape
        return torch.zeros(c, context_frames, h, w), list(plan.flags) + [plan.shot_flag]
    picked = [frame_latents_of_earlier_shots[s][i] for s, i in plan.picks]  # each [C, h, w]
    return torch.stack(picked, dim=1), list(plan.flags) + [plan.shot_flag]


def first_shot_inputs(latent_shape, context_frames: int, prompts, dtype=torch.float32):
    """The inputs of a story's first shot, which a sample whose history is dropped copies (stage 1's context
    dropout, stages 3-4's history dropout): context_frames zero latents with flags 0, the shot flag 1 (the
    last context flag + 1), and the shot's own prompt alone, the last of `prompts` (shots 0..k).
    -> (context [C, Fc, h, w], context flags, shot flag, [prompt])"""
    c, h, w = latent_shape
    return torch.zeros(c, context_frames, h, w, dtype=dtype), [0] * context_frames, 1, list(prompts[-1:])


def context_frame_indices(frames_per_shot: list[int], context_frames: int = 6) -> list[set[int]]:
    """For a story, the pixel frames of each shot that the context rule can pick for ANY later shot."""
    needed = [set() for _ in frames_per_shot]
    for k in range(1, len(frames_per_shot)):
        for s, i in plan_context(frames_per_shot[:k], context_frames).picks:
            needed[s].add(i)
    return needed


# --- pre-encoded latent stories ----------------------------------------------------------------------

@dataclass
class LatentStory:
    name: str
    shot_latents: list  # [C, F, h, w] per shot
    frame_latents: list  # [N_i, C, h, w] per shot (rows never encoded are zero; see frame_encoded)
    frame_encoded: list  # [N_i] bool per shot
    prompt_features: list  # [L, text_dim] per shot (text.build_shot_prompt of shot i)
    negative_features: torch.Tensor  # [L, text_dim]
    ranges: list
    meta: dict
    detail: list | None = None  # [F, h, w] per shot (None: latents pre-encoded before detail maps existed)

    @property
    def num_shots(self) -> int:
        return len(self.shot_latents)


class LatentStoryDataset:
    """Pre-encoded stories, all in memory (they are small at the tiny preset)."""

    def __init__(self, latent_dir):
        self.dir = Path(latent_dir)
        index = self.dir / "index.json"
        if not index.is_file():
            raise FileNotFoundError(f"no pre-encoded latents in {self.dir} (run python -m training.preencode)")
        info = json.loads(index.read_text())
        self.info = info
        self.stories = info["stories"]
        self.negative = load_file(str(self.dir / "negative.safetensors"))["negative"]
        self._tensors = {}
        for shard in sorted({s["shard"] for s in self.stories}):
            self._tensors.update(load_file(str(self.dir / shard)))
        # (story, shot) pairs: every shot is a training target, shot 0 included
        self.targets = [(i, k) for i, s in enumerate(self.stories) for k in range(s["num_shots"])]

    def __len__(self) -> int:
        return len(self.stories)

    @property
    def vae_signature(self) -> str | None:
        """vae_signature of the VAE that encoded this store (None for a store from before the record)."""
        return self.info.get("vae_signature")

    def geometry(self, preset):
        """The preset's shot geometry on this store's latent grid (the stride of the VAE that encoded it),
        tiled by the preset's DiT's patch."""
        stride = self.info.get("spatial_stride", preset.geometry.spatial_stride)
        return preset.geometry.replace(spatial_stride=stride, dit_patch=preset.dit.spatial_patch)

    def check_fits(self, preset, what: str) -> None:
        """Refuse, naming the fix, latents that `preset`'s DiT (in_channels) and geometry cannot take, e.g. a
        store pre-encoded with a VAE of another latent width: the DiT's first layer would fail on them."""
        shape = self.info.get("latent_shape")
        if shape is None:  # stores written before index.json recorded it
            return
        geo = self.geometry(preset)
        want = [preset.dit.in_channels, geo.latent_frames, geo.latent_height, geo.latent_width]
        if list(shape) != want:
            raise ValueError(
                f"the latents in {self.dir} are [channels, frames, h, w] = {list(shape)} (pre-encoded with "
                f"{self.info.get('vae_path', 'an unrecorded VAE')}), but {what} takes {want} ({preset.name} "
                f"preset): pre-encode again with a VAE of {want[0]} latent channels at the preset's size "
                f"(python -m training.preencode --set vae_path=... --set out_dir=...), or point latent_dir at such a store")

    def __getitem__(self, i: int) -> LatentStory:
        s, t = self.stories[i], self._tensors
        name = s["name"]
        shots, frames, encoded, prompts = [], [], [], []
        for k in range(s["num_shots"]):
            shot = t[f"{name}/shot{k}"]
            idx = t[f"{name}/frame_idx{k}"]
            n = s["frames_per_shot"][k]
            full = torch.zeros(n, *shot.shape[:1], *shot.shape[2:])
            mask = torch.zeros(n, dtype=torch.bool)
            if len(idx):
                full[idx] = t[f"{name}/frames{k}"]
                mask[idx] = True
            shots.append(shot)
            frames.append(full)
            encoded.append(mask)
            prompts.append(t[f"{name}/prompt{k}"])
        detail = [t[f"{name}/detail{k}"] for k in range(s["num_shots"])] if f"{name}/detail0" in t else None
        return LatentStory(name, shots, frames, encoded, prompts, self.negative, s["ranges"], s, detail)

    def history(self, story: LatentStory, k: int, context_frames: int = 6):
        """(context [C, Fc, h, w], flags [Fc + 1]) of target shot k from ground-truth frames."""
        lengths = story.meta["frames_per_shot"][:k]
        plan = plan_context(lengths, context_frames)
        missing = [(s, i) for s, i in plan.picks if not story.frame_encoded[s][i]]
        if missing:
            raise ValueError(f"story {story.name}: context frames {missing[:3]} were not pre-encoded; "
                             f"re-run training.preencode with all_frames=true or the same context_frames")
        c, _, h, w = story.shot_latents[0].shape
        return history_inputs(story.frame_latents[:k], lengths, context_frames, latent_shape=(c, h, w))


# --- batching -----------------------------------------------------------------------------------------

def pad_prompts(prompt_lists: list[list[torch.Tensor]], text_len: int | None = None) -> torch.Tensor:
    """Per sample a list of [L_i, D] prompts -> [B, P, S, D], zero-padded (P = most prompts of any sample)."""
    p = max(len(x) for x in prompt_lists)
    s = max(t.shape[0] for x in prompt_lists for t in x)
    if text_len is not None:
        s = min(s, text_len)
    d = prompt_lists[0][0].shape[-1]
    out = torch.zeros(len(prompt_lists), p, s, d)
    for b, prompts in enumerate(prompt_lists):
        for j, t in enumerate(prompts):
            out[b, j, : min(len(t), s)] = t[:s]
    return out


def prompt_ids_for(flags: torch.Tensor, num_prompts: list[int]) -> torch.Tensor:
    """flags [B, F] -> [B, F] prompt index per frame (flag k -> prompt k; one prompt -> 0)."""
    return torch.stack([prompt_ids_from_flags(f, n) for f, n in zip(flags, num_prompts)])


def frame_flags(context_flags: list[int], shot_flag: int, shot_frames: int) -> list[int]:
    """Per latent frame of [context | shot]: the context flags, then the shot flag repeated."""
    return list(context_flags) + [shot_flag] * shot_frames
