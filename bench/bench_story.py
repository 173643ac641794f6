"""Time to generate a 5-shot story with the bundled model (the README's main job): seconds, frames/s,
time to first frame.

The story is the first 5-shot story of the Story World's evaluation split (its captions, fixed seeds).
One throwaway shot warms up lazy loads first; then the whole story is generated `--repeats` times and
the best run is reported (other jobs on a shared machine only ever slow a run down).

    python bench/bench_story.py                    # tiny, CPU
    python bench/bench_story.py --device cuda --repeats 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shotstream_core.engine import ShotRequest  # noqa: E402
from shotstream_core.loading import bundled_path, load_engine  # noqa: E402
from training.evaluate import evaluation_split, warm_up  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_story(engine, item) -> dict:
    """Generate every shot of `item` in order; per-shot seconds and request -> first block seconds."""
    state = engine.new_story()
    shots, first, frames = [], [], 0
    for caption, seed in zip(item.story.shot_captions, item.seeds):
        sync(engine.device)
        t0 = time.perf_counter()
        stream = engine.stream_shot(state, ShotRequest(item.story.global_caption, caption, seed=seed))
        for b, block in enumerate(stream):
            if b == 0:
                sync(engine.device)
                first.append(time.perf_counter() - t0)
            frames += len(block.frames)
        sync(engine.device)
        shots.append(time.perf_counter() - t0)
        state = stream.state
    total = sum(shots)
    return {"seconds": total, "frames": frames, "frames_per_s": frames / total, "shot_seconds": shots,
            "time_to_first_frame_story": first[0], "time_to_first_frame_mean": sum(first) / len(first)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    trained = bundled_path(a.preset, "dit").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        engine = load_engine(preset=a.preset, device=a.device)
        load_s = time.perf_counter() - t0
    geo = engine.geometry
    item = evaluation_split(1, 0, geo.width / geo.height)[0]
    warm_up(engine)
    runs = [time_story(engine, item) for _ in range(max(1, a.repeats))]
    best = min(runs, key=lambda r: r["seconds"])
    result = {"preset": a.preset, "weights": "trained" if trained else "random (no bundled dit.safetensors)",
              "device": str(engine.device), "threads": torch.get_num_threads(), "load_s": load_s,
              "shots": item.story.num_shots, "geometry": f"{geo.width}x{geo.height}x{geo.frames_per_shot}",
              **best}
    print(f"{a.preset} ({result['weights']}) on {result['device']}, {result['threads']} threads, "
          f"{result['shots']} shots of {result['geometry']}:")
    print(f"  story: {best['seconds']:.2f} s, {best['frames']} frames, {best['frames_per_s']:.1f} frames/s")
    print(f"  time to first frame: {best['time_to_first_frame_story']:.2f} s (shot 1), "
          f"{best['time_to_first_frame_mean']:.2f} s (mean over shots)")
    print("  per shot: " + ", ".join(f"{s:.2f}" for s in best["shot_seconds"]) + f" s; model load {load_s:.1f} s")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
