"""Command line: generate a multi-shot story from a STORY.json in the reference's format.

    python -m shotstream_core generate STORY.json --out OUT.mp4 [--model tiny|PATH] [--seed S]
        [--size WxH] [--frames-per-shot N] [--vae PATH] [--text-encoder PATH] [--device auto]

STORY.json: {"global_caption": "...", "shot1": "...", "shot2": "...", ...} (1-based, as the reference).
Frames are written to the video as each block is decoded.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm


def read_story(path: Path) -> tuple[str, list[str]]:
    """STORY.json -> (global caption, shot captions in order). Every problem is a ValueError that names the
    file and the key, raised before any model is loaded."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such story file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "global_caption" not in data:
        raise ValueError(f"{path}: missing 'global_caption' (expected keys global_caption, shot1..shotN)")
    numbers = sorted(int(k[4:]) for k in data if re.fullmatch(r"shot[1-9]\d*", k))
    if not numbers:
        raise ValueError(f"{path}: no shot captions (expected keys shot1, shot2, ...)")
    missing = [f"shot{n}" for n in range(1, numbers[-1] + 1) if n not in numbers]
    if missing:
        raise ValueError(f"{path}: {', '.join(missing)} missing (found {', '.join(f'shot{n}' for n in numbers)}); "
                         f"number the shots 1..N without gaps")
    for key in ["global_caption", *(f"shot{n}" for n in numbers)]:
        if not isinstance(data[key], str):
            raise ValueError(f"{path}: {key} must be text, got {type(data[key]).__name__}")
        if key != "global_caption" and not data[key].strip():
            raise ValueError(f"{path}: {key} is empty; describe what happens in that shot")
    return data["global_caption"], [data[f"shot{n}"] for n in numbers]


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size must look like WIDTHxHEIGHT (e.g. 832x480), got {text!r}") from None
    return w, h


def generate(args) -> int:
    from .engine import ShotRequest
    from .loading import load_engine
    from .video import VideoWriter

    global_caption, captions = read_story(Path(args.story))
    is_preset = args.model in ("tiny", "micro")
    if not is_preset and not Path(args.model).exists():
        raise ValueError(f"--model {args.model}: no such file or folder; give a DiT checkpoint or a bundled "
                         f"model (tiny)")
    engine = load_engine(None if is_preset else args.model, args.vae, args.text_encoder,
                         preset=args.model if is_preset else "tiny", dtype=args.dtype, device=args.device)
    geo = engine.geometry  # replace() checks a new size against this model's VAE stride and DiT patch
    if args.size:
        w, h = parse_size(args.size)
        geo = geo.replace(width=w, height=h)
    if args.frames_per_shot:
        geo = geo.replace(frames_per_shot=args.frames_per_shot)
    trained = engine.geometry
    if (geo.width, geo.height, geo.frames_per_shot) != (trained.width, trained.height, trained.frames_per_shot):
        print(f"note: this model was trained at {trained.width}x{trained.height}, {trained.frames_per_shot} frames "
              f"a shot; {geo.width}x{geo.height}, {geo.frames_per_shot} frames runs but may look worse",
              file=sys.stderr)
    state = engine.new_story(geo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blocks_per_shot = -(-geo.latent_frames // engine.sampler.block_frames)
    start = time.perf_counter()
    first_frame_at = None
    with VideoWriter(out, fps=geo.fps) as writer, tqdm(total=len(captions) * blocks_per_shot, unit="block") as bar:
        for i, caption in enumerate(captions):
            bar.set_description(f"shot {i + 1}/{len(captions)}")
            stream = engine.stream_shot(state, ShotRequest(global_caption, caption, seed=args.seed + i))
            for block in stream:
                writer.write(block.frames)
                first_frame_at = first_frame_at or time.perf_counter() - start
                bar.update(1)
            state = stream.state
    total = time.perf_counter() - start
    frames = state.frames().shape[0]
    print(f"wrote {out} ({frames} frames, {geo.width}x{geo.height} at {geo.fps} fps) in {total:.1f} s; "
          f"first frame after {first_frame_at:.2f} s")
    if args.save_state:
        print(f"story state: {state.save(args.save_state)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shotstream_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a story video")
    g.add_argument("story", help="STORY.json (global_caption, shot1..shotN)")
    g.add_argument("--out", required=True, help="output .mp4 or .webp")
    g.add_argument("--model", default="tiny", help="'tiny' (bundled) or a DiT checkpoint path")
    g.add_argument("--vae", default=None, help="VAE file (needed for real Wan checkpoints)")
    g.add_argument("--text-encoder", default=None, help="text encoder file (umT5 for real Wan checkpoints)")
    g.add_argument("--seed", type=int, default=0, help="seed of shot 1; shot i uses seed + i - 1")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default: the model's)")
    g.add_argument("--frames-per-shot", type=int, default=None, help="4k+1 pixel frames (default: the model's)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--device", default="auto")
    g.add_argument("--save-state", default=None, help="also save the story state (safetensors + json) here")
    args = parser.parse_args(argv)
    try:
        return generate(args)
    except ValueError as e:  # bad sizes, captions, files: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
