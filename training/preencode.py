"""Latent pre-encoding: every training story's shots, context frames and prompts, as safetensors shards.

    python -m training.preencode --config training/configs/tiny-preencode.yaml

Per story: each shot encoded as one clip (first frame alone, then chunks of 4), with its pixel detail on
the latent grid (training.detail: where the small characters are); pixel frames encoded alone
(the global context is built from single-frame latents, as at inference); the prompt of every shot
(global caption + "shot{i}:" + shot caption, text.build_shot_prompt) and the empty negative prompt
encoded with the preset's text encoder. With all_frames=false only the frames the context rule can pick
for the story's later shots are encoded (on 2 CPU cores the VAE, not the DiT, is the bottleneck).

Resumable: shards are written whole (temp file + rename) and skipped when present. Under torchrun each
process encodes every world_size-th shard. The time budget stops after the current shard; the index
then holds what is done. OUT/inputs.json records what the store is built from (data_dir, the config
fields that change the shards, the VAE file's hash and each story's ranges, caption-JSON hash and video
content digest): a later run with other inputs is refused by name (InputsChanged), since the shards it
would skip hold the old ones; a resume with the same inputs goes on.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from shotstream_core.config import get_preset
from shotstream_core.files import save_tensors
from shotstream_core.loading import make_text_encoder
from shotstream_core.text import build_shot_prompt
from shotstream_core.vae import load_vae, vae_signature

from .common import StageConfig, clear_pause, mark_done, pause_stage, run_stage, save_config
from .data import context_frame_indices, note_fitting, shot_frames
from .detail import latent_detail_map
from .storyworld.storage import check_unique_names, read_index


@dataclass
class PreencodeConfig(StageConfig):
    out_dir: str = "runs/tiny/latents"
    data_dir: str = "runs/tiny/data"
    vae_path: str = "runs/tiny/decoder/vae.safetensors"
    num_stories: int = 600
    shard_size: int = 25  # stories per shard
    all_frames: bool = False  # encode every pixel frame alone (else only those the context rule picks)
    batch_size: int = 8  # shots per VAE call
    frame_batch: int = 64  # single frames per VAE call
    negative_prompt: str = ""
    detail_radius: int = 3  # pixels; the per-shot detail maps the teacher's detail_weight reads (training.detail)

    def lengthens_exactly(self) -> bool:
        return False  # its length is num_stories, part of the inputs a store is checked against


# The config fields that change what the shards hold (not batch sizes, threads, budgets or the device).
OUTPUT_FIELDS = ("preset", "num_stories", "shard_size", "all_frames", "negative_prompt", "detail_radius")
INPUTS = "inputs.json"


class InputsChanged(ValueError):
    """A store re-run with other inputs than it was built from: a user error (one line, exit 2)."""


def _sha(path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()[:16]


def _video_digest(path) -> str | None:
    """Size and a hash of a video's first and last MiB: its content, not its file time (a data set written
    again, or copied, keeps its digest), without reading every byte of a large real data set."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(1 << 20)
            f.seek(max(len(head), size - (1 << 20)))
            tail = f.read()
    except OSError:
        return None
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"


def store_inputs(cfg: PreencodeConfig) -> dict:
    """What a store built with cfg holds: the config fields that change it, the data set's index path, the
    VAE file's hash, and per story its ranges, a hash of its caption JSON and a digest of its video."""
    stories = []
    for rec in read_index(Path(cfg.data_dir))[:cfg.num_stories]:
        video = _video_digest(rec.video_path) if rec.video_path is not None else None
        stories.append({"name": rec.name, "ranges": [list(r) for r in rec.ranges], "captions": _sha(rec.json_path),
                        "video": video})
    return {"data_dir": os.path.normpath(cfg.data_dir), **{k: getattr(cfg, k) for k in OUTPUT_FIELDS},
            "vae": _sha(cfg.vae_path), "stories": stories}


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def inputs_changes(was: dict, now: dict) -> list[str]:
    """What differs between two store_inputs() records, in words."""
    changes = [f"{k} {was.get(k)!r} -> {now.get(k)!r}" for k in ("data_dir", *OUTPUT_FIELDS) if was.get(k) != now.get(k)]
    if was.get("vae") != now.get("vae"):
        changes.append("the VAE file (vae_path) is another one")
    old = {s["name"]: s for s in was.get("stories", [])}
    new = {s["name"]: s for s in now.get("stories", [])}
    for key, what in (("captions", "captions"), ("ranges", "shot ranges"), ("video", "video")):
        # a video recorded as [size, time] (the first version of this record) cannot be compared
        diff = [n for n in new if n in old and old[n].get(key) != new[n].get(key)
                and not (key == "video" and isinstance(old[n].get(key), list))]
        if diff:
            changes.append(f"{what} of {_names(diff)} changed")
    if was.get("num_stories") == now.get("num_stories"):
        gone, added = [n for n in old if n not in new], [n for n in new if n not in old]
        if gone:
            changes.append(f"stories {_names(gone)} are no longer in the data")
        if added:
            changes.append(f"stories {_names(added)} are new")
    if not changes and [s["name"] for s in was.get("stories", [])] != [s["name"] for s in now.get("stories", [])]:
        changes.append("the stories' order changed")
    return changes


def check_inputs(cfg: PreencodeConfig, out: Path, is_main: bool = True) -> None:
    """Refuse a store built from other inputs; record them in a new one (or one from before the record)."""
    now = store_inputs(cfg)
    path = out / INPUTS
    if path.is_file():
        changes = inputs_changes(json.loads(path.read_text()), now)
        if changes:
            raise InputsChanged(
                f"{out} was pre-encoded from other inputs ({'; '.join(changes)}); its shards would be kept as they "
                f"are. Delete {out} (and the stages trained on it) to encode it again, or set another out_dir")
    elif is_main:  # whole or not at all: another rank may be reading it
        tmp = out / f".{INPUTS}.tmp"
        tmp.write_text(json.dumps(now))
        os.replace(tmp, path)


@torch.no_grad()
def encode_shard(records, vae, encoder, cfg: PreencodeConfig, geometry, context_frames: int):
    """Stories -> (tensors for the shard file, per-story index entries)."""
    tensors, entries, clips = {}, [], []
    for rec, clip in records:
        shots = shot_frames(clip, geometry)
        name = rec.name
        lengths = [len(s) for s in shots]
        needed = ([set(range(n)) for n in lengths] if cfg.all_frames
                  else context_frame_indices(lengths, context_frames))
        clips.append((name, shots, needed))
        with warnings.catch_warnings(record=True) as cut:  # a caption cut to the text length: say whose
            warnings.simplefilter("always")
            prompts = [build_shot_prompt(clip.global_caption, text, i, encoder.count_tokens, encoder.max_tokens)
                       for i, text in enumerate(clip.shot_captions)]
        for w in cut:
            warnings.warn(f"{clip.source or name}: {w.message}", w.category, stacklevel=2)
        for i, feat in enumerate(encoder.encode(prompts)):
            tensors[f"{name}/prompt{i}"] = feat.float().cpu().contiguous()
        entries.append({"name": name, "num_shots": len(shots), "frames_per_shot": lengths,
                        "ranges": [list(r) for r in clip.ranges], "global_caption": clip.global_caption,
                        "shot_captions": list(clip.shot_captions), "prompts": prompts,
                        "video_path": str(rec.video_path), "json_path": str(rec.json_path)})
    # whole shots, batched across stories: [B, 3, F, H, W]
    jobs = [(name, k, s) for name, shots, _ in clips for k, s in enumerate(shots)]
    for i in range(0, len(jobs), cfg.batch_size):
        part = jobs[i:i + cfg.batch_size]
        video = torch.stack([torch.from_numpy(s) for _, _, s in part]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        z = vae.encode(video.to(vae.device)).cpu()
        detail = latent_detail_map(video, vae.config.temporal_stride, vae.config.spatial_stride, cfg.detail_radius)
        for (name, k, _), zk, dk in zip(part, z, detail):
            tensors[f"{name}/shot{k}"] = zk.contiguous()
            tensors[f"{name}/detail{k}"] = dk.contiguous()
    # single frames encoded alone: [N, 3, H, W]
    frames = [(name, k, j, shots[k][j]) for name, shots, needed in clips for k in range(len(shots))
              for j in sorted(needed[k])]
    latents = []
    for i in range(0, len(frames), cfg.frame_batch):
        part = torch.stack([torch.from_numpy(f[3]) for f in frames[i:i + cfg.frame_batch]])
        latents.append(vae.encode_frames((part.permute(0, 3, 1, 2).float() / 127.5 - 1).to(vae.device)).cpu())
    latents = torch.cat(latents) if latents else torch.zeros(0)
    for name, shots, needed in clips:
        for k in range(len(shots)):
            rows = [n for n, f in enumerate(frames) if f[0] == name and f[1] == k]
            tensors[f"{name}/frame_idx{k}"] = torch.tensor([frames[n][2] for n in rows], dtype=torch.long)
            tensors[f"{name}/frames{k}"] = (latents[rows].contiguous() if rows
                                           else torch.zeros(0, *tensors[f"{name}/shot{k}"].shape[:1]))
    return tensors, entries


def preencode(cfg: PreencodeConfig, dist) -> dict:
    """Encode the training stories' shots, context frames and prompts into safetensors shards."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    preset = get_preset(cfg.preset)
    geometry = preset.geometry
    vae_path = Path(cfg.vae_path)
    if not vae_path.is_file():
        raise FileNotFoundError(f"no trained VAE at {vae_path}; run python -m training.vae_stage first")
    check_inputs(cfg, out, dist.is_main)
    vae = load_vae(vae_path, device=dist.device)
    encoder = make_text_encoder(preset.text_encoder, None, preset.dit.text_dim, preset.dit.text_len)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
        neg = encoder.encode([cfg.negative_prompt])[0].float().contiguous()
        save_tensors({"negative": neg}, out / "negative.safetensors")

    # Each shard's videos are decoded when it is encoded (not every story up front: memory, and a sitting
    # whose budget would run out while decoding a large data set before its first shard).
    records = read_index(Path(cfg.data_dir))[:cfg.num_stories]
    check_unique_names(records)
    if records:
        note_fitting(records[0], geometry)
    shards = [records[i:i + cfg.shard_size] for i in range(0, len(records), cfg.shard_size)]
    size = (geometry.height, geometry.width)
    budget = cfg.max_minutes * 60 if cfg.max_minutes > 0 else float("inf")
    prev = json.loads((out / "progress.json").read_text()).get("elapsed_s", 0.0) if (out / "progress.json").is_file() else 0.0
    clear_pause(out, dist.is_main)
    stopped, encoded = False, 0
    for n, shard in enumerate(shards):
        if n % dist.world_size != dist.rank:
            continue
        path = out / f"shard_{n:04d}.safetensors"
        if path.is_file() and (out / f"shard_{n:04d}.json").is_file():
            continue
        if encoded and time.perf_counter() - t0 > budget:  # this sitting's budget; every sitting makes one
            stopped = True
            break
        clips = [(rec, rec.read(size=size)) for rec in shard]
        tensors, entries = encode_shard(clips, vae, encoder, cfg, geometry, preset.sampler.context_frames)
        encoded += 1
        save_tensors(tensors, path, metadata={"stories": str(len(entries))})  # whole or not at all
        for e in entries:
            e["shard"] = path.name
        (out / f"shard_{n:04d}.json").write_text(json.dumps(entries))
        if dist.is_main:
            print(f"shard {n + 1}/{len(shards)} done, {prev + time.perf_counter() - t0:.0f}s", flush=True)
            (out / "progress.json").write_text(json.dumps({"elapsed_s": prev + time.perf_counter() - t0}))
    # Shards are per rank and each rank watches the clock alone: any rank that stops records why
    # (its exit ends the torchrun job); the shards written stay, the next sitting does the rest.
    if stopped:
        raise pause_stage(out, f"pre-encoding stopped before shard {n + 1} of {len(shards)}: this sitting's time "
                               f"budget (max_minutes={cfg.max_minutes:g}) ran out. Run the same command again to "
                               f"go on (finished shards are kept)")
    dist.barrier()
    summary = {}
    if dist.is_main:
        stories = []
        for p in sorted(out.glob("shard_*.json")):
            stories += json.loads(p.read_text())
        if not stories:
            raise RuntimeError(f"no story to encode in {cfg.data_dir}: write the training set first")
        c, f, h, w = load_file(str(out / stories[0]["shard"]))[f"{stories[0]['name']}/shot0"].shape
        info = {"preset": cfg.preset, "latent_shape": [c, f, h, w],
                "spatial_stride": vae.config.spatial_stride, "context_frames": preset.sampler.context_frames,
                "all_frames": cfg.all_frames, "vae_path": str(vae_path), "vae_signature": vae_signature(vae),
                "stories": stories}
        (out / "index.json").write_text(json.dumps(info))
        wall = prev + time.perf_counter() - t0
        summary = {"stories": len(stories), "shots": sum(s["num_shots"] for s in stories),
                   "wall_s": wall, "stop_reason": "done"}
        inputs = _sha(out / INPUTS)  # which inputs: the same counts from other data are another store
        if inputs is not None:
            summary["inputs"] = inputs
        mark_done(out, **summary)
        print(json.dumps(summary), flush=True)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(preencode, PreencodeConfig, argv)


if __name__ == "__main__":
    main()
