"""Command line: generate a multi-shot story from a STORY.json in the reference's format.

    python -m shotstream_core generate STORY.json --out OUT.mp4 [--model tiny|PATH] [--seed S]
        [--size WxH] [--frames-per-shot N] [--vae PATH] [--text-encoder PATH] [--device auto] [--threads N]
        [--footage IMAGE_OR_VIDEO]

STORY.json: {"global_caption": "...", "shot1": "...", "shot2": "...", ...} (1-based, as the reference).
With --footage, shot 1 is that image or clip (fitted to the story's size and frames per shot) and shot1's
caption says what it shows; generation starts at shot 2.
Frames are written as each block is decoded, to a hidden partial file beside OUT that replaces OUT only
when the whole story is done: a failed or interrupted run (Ctrl-C, SIGTERM: exit 130 / 143) leaves OUT
as it was.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from tqdm import tqdm

# CPU threads for torch when --threads is not given: the bundled small models run fastest on one (torch's
# default of one a core was measured 5-14x slower on a loaded 2-core machine, as scripts/run_story.py's
# default of 1 assumes); a user's checkpoint, or any model on a GPU, keeps torch's default (its text
# encoder, umT5-XXL for Wan, runs on the CPU and wants every core).
SMALL_MODEL_THREADS = 1
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def read_story(path: Path) -> tuple[str, list[str]]:
    """STORY.json -> (global caption, shot captions in order). Every problem is a ValueError that names the
    file and the key, raised before any model is loaded."""
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # JSON is UTF-8, whatever the locale says
    except FileNotFoundError:
        raise ValueError(f"{path}: no such story file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "global_caption" not in data:
        raise ValueError(f"{path}: missing 'global_caption' (expected keys global_caption, shot1..shotN)")
    numbers = sorted(int(k[4:]) for k in data if re.fullmatch(r"shot[1-9]\d*", k))
    if not numbers:
        raise ValueError(f"{path}: no shot captions (expected keys shot1, shot2, ...)")
    if numbers != list(range(1, len(numbers) + 1)):
        # only the first gap: a typo such as shot300000000 must not make a list of every number below it
        gap = next(n for n, found in enumerate(numbers, start=1) if n != found)
        shown = ", ".join(f"shot{n}" for n in numbers[:8]) + (", ..." if len(numbers) > 8 else "")
        raise ValueError(f"{path}: shot{gap} missing (found {shown}); number the shots 1..N without gaps")
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
    if w <= 0 or h <= 0:
        raise ValueError(f"--size {text}: width and height must be positive (e.g. 832x480)")
    return w, h


def state_path(text: str) -> Path:
    """--save-state PATH -> the base StoryState.save adds .safetensors and .json to: a PATH that already ends
    in one of them loses it (st.json -> st.safetensors + st.json, not st.json.safetensors + st.json.json)."""
    path = Path(text)
    return path.with_suffix("") if path.suffix.lower() in (".json", ".safetensors") else path


def check_args(args, shots: int) -> None:
    """Every problem with the arguments is a ValueError raised here, before any model loads and before any
    folder is made."""
    import torch

    from .config import validate_frames
    from .loading import resolve_device
    from .video import SUFFIXES

    if args.model not in ("tiny", "micro") and not Path(args.model).exists():
        raise ValueError(f"--model {args.model}: no such file or folder; give a DiT checkpoint or a bundled "
                         f"model (tiny)")
    for flag, given in (("--vae", args.vae), ("--text-encoder", args.text_encoder)):
        if given is not None and not Path(given).exists():
            raise ValueError(f"{flag} {given}: no such file or folder")
    if args.device != "auto":
        try:
            torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {args.device!r}: not a device; use {DEVICE_CHOICES}") from None
        resolve_device(args.device)  # cuda asked for where there is none
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63); got {args.seed}")
    if args.seed + shots - 1 >= 2**63:
        raise ValueError(f"--seed {args.seed}: shot {shots} would use seed {args.seed + shots - 1}, past "
                         f"2**63 - 1; use a seed below {2**63 - shots + 1}")
    if args.frames_per_shot is not None:
        try:
            validate_frames(args.frames_per_shot)
        except ValueError as e:
            raise ValueError(f"--frames-per-shot: {e}") from None
    if args.size:
        parse_size(args.size)  # positive numbers; the model's stride and patch are checked once it is loaded
    if args.footage is not None:
        if not Path(args.footage).is_file():
            raise ValueError(f"--footage {args.footage}: no such file; give an image or a video")
        if shots < 2:
            raise ValueError("--footage is shot 1, and the story has no shot 2 to generate after it: add shot2 "
                             "to the story file")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads must be 1 or more (0: torch's default); got {args.threads}")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory: give a file name like {out / 'story.mp4'}")
    if out.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--out {out}: unsupported video type {out.suffix or '(no suffix)'}; "
                         f"end the name in {' or '.join(SUFFIXES)}")
    check_writable_path("--out", out)
    if args.save_state:
        from .state import StoryState

        tensors = StoryState.file_path(state_path(args.save_state))  # the two files save() writes
        for path in (tensors, tensors.with_suffix(".json")):
            check_writable_path("--save-state", path)


def check_writable_path(flag: str, path: Path) -> None:
    """A file can be made at `path`: it is no folder, and the nearest existing folder above it is one."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file name inside it")
    folder = next((p for p in path.absolute().parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")


def generate(args) -> int:
    from .engine import ShotRequest
    from .loading import load_engine
    from .video import VideoWriter, read_video

    global_caption, captions = read_story(Path(args.story))
    check_args(args, len(captions))
    footage = None
    if args.footage is not None:  # read (and refused, if unreadable) before the model loads
        try:
            footage = read_video(args.footage)[0]
        except ValueError as e:
            raise ValueError(f"--footage: {e}") from None
    is_preset = args.model in ("tiny", "micro")
    threads = args.threads
    if threads is None:
        from .loading import resolve_device

        threads = SMALL_MODEL_THREADS if is_preset and resolve_device(args.device).type == "cpu" else 0
    if threads:
        import torch

        torch.set_num_threads(threads)
    engine = load_engine(None if is_preset else args.model, args.vae, args.text_encoder,
                         preset=args.model if is_preset else "tiny", dtype=args.dtype, device=args.device)
    geo = engine.geometry  # replace() checks a new size against this model's VAE stride and DiT patch
    if args.size:
        w, h = parse_size(args.size)
        geo = geo.replace(width=w, height=h)
    if args.frames_per_shot is not None:
        geo = geo.replace(frames_per_shot=args.frames_per_shot)
    trained = engine.geometry
    if (geo.width, geo.height, geo.frames_per_shot) != (trained.width, trained.height, trained.frames_per_shot):
        print(f"note: this model was trained at {trained.width}x{trained.height}, {trained.frames_per_shot} frames "
              f"a shot; {geo.width}x{geo.height}, {geo.frames_per_shot} frames runs but may look worse",
              file=sys.stderr)
    state = engine.new_story(geo)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    blocks_per_shot = len(engine.sampler.block_spans(geo.latent_frames))
    start = time.perf_counter()
    first_frame_at = None
    generated = len(captions) - (footage is not None)
    with VideoWriter(out, fps=geo.fps) as writer, tqdm(total=generated * blocks_per_shot, unit="block") as bar:
        if footage is not None:
            state = engine.add_footage(state, footage, global_caption, captions[0])
            writer.write(state.shots[0].frames)
        for i, caption in enumerate(captions[state.num_shots:], start=state.num_shots):  # after any footage
            bar.set_description(f"shot {i + 1}/{len(captions)}")
            stream = engine.stream_shot(state, ShotRequest(global_caption, caption, seed=args.seed + i))
            for block in stream:
                writer.write(block.frames)
                first_frame_at = first_frame_at or time.perf_counter() - start
                bar.update(1)
            state = stream.state
    total = time.perf_counter() - start
    args.wrote = out
    frames = sum(shot.num_frames for shot in state.shots)  # state.frames() would copy the story as floats
    print(f"wrote {out} ({frames} frames, {geo.width}x{geo.height} at {geo.fps} fps) in {total:.1f} s; "
          f"first frame after {first_frame_at:.2f} s")
    if args.save_state:
        try:
            print(f"story state: {state.save(state_path(args.save_state))}")
        except OSError as e:
            raise OSError(f"--save-state: {e} (the video was written: {out})") from None
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that with-blocks clean up as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def _note(message, category, filename, lineno, file=None, line=None):
    # the engine's warnings (random weights, a cut prompt...) as one line each, above any progress bar
    tqdm.write(f"note: {message}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shotstream_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a story video")
    g.add_argument("story", help="STORY.json (global_caption, shot1..shotN)")
    g.add_argument("--out", required=True, help="output .mp4 or .webp")
    g.add_argument("--model", default="tiny", help="'tiny' (bundled) or a DiT checkpoint path")
    g.add_argument("--vae", default=None, help="VAE file: the one the DiT was trained with (needed for real Wan "
                                              "checkpoints and for students trained on a VAE of your own; default: "
                                              "the bundled model's)")
    g.add_argument("--text-encoder", default=None, help="text encoder file (umT5 for real Wan checkpoints)")
    g.add_argument("--seed", type=int, default=0, help="seed of shot 1; shot i uses seed + i - 1")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT, multiples of 16 (default: the model's)")
    g.add_argument("--frames-per-shot", type=int, default=None, help="4k+1 pixel frames (default: the model's)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: cuda if there is one)")
    g.add_argument("--threads", type=int, default=None,
                   help=f"CPU threads for torch; 0 = torch's default (default: {SMALL_MODEL_THREADS} for a bundled "
                        f"model on the CPU, where it is fastest, else torch's default)")
    g.add_argument("--footage", default=None,
                   help="an image or video that is shot 1 (shot1's caption says what it shows); shots 2.. follow it")
    g.add_argument("--save-state", default=None,
                   help="also save the story state here (PATH.safetensors + PATH.json)")
    args = parser.parse_args(argv)
    out, args.wrote = Path(args.out), None
    existed = out.is_file()
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    old_term = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with warnings.catch_warnings():  # restores showwarning on the way out
            warnings.showwarning = _note
            return generate(args)
    except ValueError as e:  # bad sizes, captions, files: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (a full disk, a busy --out): it names the file
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the writer has removed its partial file
        if args.wrote:
            what = f"wrote {args.wrote}, but not the story state"
        else:
            what = f"nothing was written; {out} left as it was" if existed else "nothing was written"
        print(f"interrupted: {what}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    finally:
        if old_term is not None:  # None: the handler was set outside Python, and cannot be put back from here
            signal.signal(signal.SIGTERM, old_term)


if __name__ == "__main__":
    sys.exit(main())
