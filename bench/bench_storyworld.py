"""Story World throughput: stories per second for rendering, and for rendering + mp4 writing.

    python bench/bench_storyworld.py [--stories 100] [--shots 5] [--preset tiny]

Making N training stories takes about N / (render+write rate) seconds (one process).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shotstream_core.config import get_preset  # noqa: E402
from training.storyworld import make_split, render_story, write_story  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stories", type=int, default=100)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    geometry = get_preset(args.preset).geometry
    stories = make_split("train", args.stories, num_shots=args.shots)
    frames_per_story = args.shots * geometry.frames_per_shot

    t = time.perf_counter()
    for s in stories:
        render_story(s, geometry)
    render_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, s in enumerate(stories):
            write_story(s, tmp, f"{i:05d}", geometry)
        write_s = time.perf_counter() - t

    n = args.stories
    print(f"geometry {geometry.height}x{geometry.width}, {args.shots} shots x {geometry.frames_per_shot} frames "
          f"({frames_per_story} frames a story), {n} stories")
    print(f"render:             {n / render_s:7.1f} stories/s  ({n * frames_per_story / render_s:8.0f} frames/s)")
    print(f"render + mp4 write: {n / write_s:7.1f} stories/s  ({n * frames_per_story / write_s:8.0f} frames/s)")
    print(f"1000 stories: about {1000 / (n / write_s) / 60:.1f} min")


if __name__ == "__main__":
    main()
