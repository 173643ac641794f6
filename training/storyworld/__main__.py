"""python -m training.storyworld {make, score, sheet}: write stories, score videos, draw contact sheets."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from shotstream_core.config import ShotGeometry, get_preset

from .world import EVAL_SEED, SPLITS, make_split, make_story, story_seed, training_stories


def _shots(text: str) -> tuple[int, int]:
    """"5" -> (5, 5); "2-5" -> (2, 5)."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shots wants K or LO-HI, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--shots needs 1 <= LO <= HI, got {text!r}")
    return lo, hi


def cmd_make(args) -> None:
    from .analyse import MIN_SHOT_FRAMES, short_shot_advice
    from .storage import write_stories

    geometry = get_preset(args.preset).geometry
    if args.height or args.width or args.frames:
        geometry = ShotGeometry(args.height or geometry.height, args.width or geometry.width,
                                args.frames or geometry.frames_per_shot, geometry.fps)
    if geometry.frames_per_shot < MIN_SHOT_FRAMES:  # fine to train on, but the analyser cannot score them
        print(f"note: {geometry.frames_per_shot}-frame shots cannot be scored: {short_shot_advice()}",
              file=sys.stderr)
    aspect = geometry.width / geometry.height
    if args.split == "train":  # the training set's own rule: `--shots 2-4` rebuilds the tiny data set
        lo, hi = args.shots or (5, 5)
        stories = training_stories(args.stories, lo, hi, aspect=aspect)
    elif args.split:
        if args.shots is not None:
            sys.exit(f"--shots does not apply to --split {args.split}: its stories have "
                     f"{SPLITS[args.split][1]} shots")
        stories = make_split(args.split, args.stories, aspect=aspect)
    else:
        if args.seed == EVAL_SEED:
            sys.exit(f"seed {EVAL_SEED} is the evaluation seed; use --split eval5/eval10 for evaluation "
                     f"stories, or any other seed for training stories")
        lo, hi = args.shots or (5, 5)
        stories = [make_story(story_seed(args.seed, i), lo + story_seed(args.seed, i, 1) % (hi - lo + 1),
                              aspect=aspect) for i in range(args.stories)]
    t = time.time()
    csv_path = write_stories(stories, args.out, geometry, progress=not args.quiet)
    print(f"wrote {len(stories)} stories to {csv_path} in {time.time() - t:.1f} s")


def cmd_score(args) -> None:
    from .scoring import score_dirs

    try:
        metrics = score_dirs(args.stories, args.videos, per_story=not args.summary_only)
    except (ValueError, FileNotFoundError) as e:  # the user's input, not a bug: say what to fix
        sys.exit(f"storyworld score: {e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(metrics, indent=2))
    summary = {k: metrics[k] for k in ("adherence", "memory", "memory_stderr", "memory_by_kind", "cut_f1", "drift",
                                        "flicker", "counts")}
    print(json.dumps(summary, indent=2))


def cmd_sheet(args) -> None:
    from .sheet import sheet_for

    img = sheet_for(args.path, story=args.story, per_shot=args.frames)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out} ({img.width}x{img.height})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m training.storyworld", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    m = sub.add_parser("make", help="write stories in the reference's data format")
    m.add_argument("--out", required=True, help="folder for index.csv, NAME.json, NAME.mp4, NAME.truth.json")
    m.add_argument("--stories", type=int, required=True)
    m.add_argument("--seed", type=int, default=0, help="root seed of training stories")
    m.add_argument("--shots", type=_shots, default=None, help="shots a story: K or LO-HI (default 5)")
    m.add_argument("--split", choices=sorted(SPLITS), help="a named split instead of --seed")
    m.add_argument("--preset", default="tiny", help="geometry preset (default tiny: 64x64, 33 frames)")
    m.add_argument("--height", type=int)
    m.add_argument("--width", type=int)
    m.add_argument("--frames", type=int, help="frames per shot (4k+1)")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(fn=cmd_make)

    s = sub.add_parser("score", help="score generated videos (one NAME.mp4 per stored story)")
    s.add_argument("--stories", required=True)
    s.add_argument("--videos", required=True)
    s.add_argument("--out", required=True, help="metrics JSON")
    s.add_argument("--summary-only", action="store_true", help="leave per-story rows out of the JSON")
    s.set_defaults(fn=cmd_score)

    c = sub.add_parser("sheet", help="contact sheet of a stored story or any mp4")
    c.add_argument("path", help="a story (NAME, NAME.mp4, NAME.json, NAME.truth.json) or any mp4")
    c.add_argument("--out", required=True, help="PNG path")
    c.add_argument("--story", help="stored story whose captions and ranges to use for a generated video")
    c.add_argument("--frames", type=int, default=4, help="frames shown per shot")
    c.set_defaults(fn=cmd_sheet)

    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
