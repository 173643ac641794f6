"""Context encoding per shot: the history frames re-encoded for every shot (no cache) against the engine's
ContextLatentCache, which encodes each picked frame once, side by side in one run.

A story of --shots shots is walked in order, as a user makes it; for each shot the engine's global-context
latents are built twice, by an engine whose cache keeps nothing and by one whose cache is warm from the
shots before (rounds alternate, medians kept). The DiT is not run: the frames are random, since only which
frames are picked and their size matter.

    python bench/bench_context.py                          # the tiny VAE at 64x64 and Wan2.1's VAE at 96x160
    python bench/bench_context.py --case wan2.1 --height 480 --width 832 --device cuda --dtype bf16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shotstream_core.config import get_preset  # noqa: E402
from shotstream_core.context import plan_context  # noqa: E402
from shotstream_core.engine import ShotStreamEngine  # noqa: E402
from shotstream_core.loading import DTYPES  # noqa: E402
from shotstream_core.model import CausalWanDiT  # noqa: E402
from shotstream_core.state import ShotRecord  # noqa: E402
from shotstream_core.text import RandomTextEncoder  # noqa: E402
from shotstream_core.vae import WanVAE  # noqa: E402


def build(vae_name: str, device: str, dtype: torch.dtype, capacity: int | None) -> ShotStreamEngine:
    preset = get_preset("tiny")
    torch.manual_seed(0)
    dit = CausalWanDiT(preset.dit).to(device, dtype).eval().requires_grad_(False)
    vae = WanVAE(vae_name).to(device, dtype).eval().requires_grad_(False)
    text = RandomTextEncoder(dim=preset.dit.text_dim, max_tokens=preset.dit.text_len)
    engine = ShotStreamEngine(dit, vae, text, preset, f"bench-{vae_name}")
    if capacity is not None:
        engine.context_latents.capacity = capacity
    return engine


def random_story(engine: ShotStreamEngine, shots: int, height: int, width: int, frames: int):
    state = engine.new_story(engine.geometry.replace(height=height, width=width, frames_per_shot=frames))
    gen = torch.Generator().manual_seed(0)
    for i in range(shots):
        pixels = torch.randint(0, 256, (frames, height, width, 3), generator=gen, dtype=torch.uint8)
        state = state.with_shot(ShotRecord("a story.", f"shot {i}", "", i, 1, pixels))
    return state


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def walk(engine: ShotStreamEngine, story, device: str) -> list[float]:
    """Seconds to build each shot's context (shots 2..N), the story's shots taken in order."""
    geo = story.geometry
    seconds = []
    for k in range(1, story.num_shots):
        plan = plan_context([s.num_frames for s in story.shots[:k]], engine.sampler.context_frames)
        sync(device)
        start = time.perf_counter()
        engine._context_latents(story.truncate(k), plan, (geo.latent_height, geo.latent_width))
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_case(vae_name: str, height: int, width: int, frames: int, shots: int, repeats: int,
               device: str, dtype: torch.dtype) -> None:
    cold = build(vae_name, device, dtype, capacity=0)
    warm = build(vae_name, device, dtype, capacity=None)
    story = random_story(cold, shots, height, width, frames)
    walk(cold, story, device)  # warm-up of the kernels (and of nothing else: this cache keeps nothing)
    cold_rounds, warm_rounds = [], []
    for _ in range(repeats):
        cold_rounds.append(walk(cold, story, device))
        warm.context_latents.clear()
        warm.context_latents.encoded = 0
        warm_rounds.append(walk(warm, story, device))
    per_shot_cold = [statistics.median(r[i] for r in cold_rounds) for i in range(shots - 1)]
    per_shot_warm = [statistics.median(r[i] for r in warm_rounds) for i in range(shots - 1)]
    picks = sum(len(plan_context([frames] * k, cold.sampler.context_frames).picks) for k in range(1, shots))
    print(f"\n{vae_name} VAE at {height}x{width}, {shots} shots, {device} {str(dtype).removeprefix('torch.')}")
    print("shot   no cache s   cache s")
    for k, (c, w) in enumerate(zip(per_shot_cold, per_shot_warm), start=2):
        print(f"{k:4d}   {c:10.4f}   {w:7.4f}")
    total_cold, total_warm = sum(per_shot_cold), sum(per_shot_warm)
    print(f"story: {total_cold:.3f} s without the cache, {total_warm:.3f} s with it "
          f"(ratio {total_warm / total_cold:.2f}); frames encoded {picks} against {warm.context_latents.encoded}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["tiny", "wan2.1", "all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--height", type=int, default=96, help="wan2.1 case height (the tiny case is 64x64)")
    p.add_argument("--width", type=int, default=160, help="wan2.1 case width")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.case in ("tiny", "all"):
        geo = get_preset("tiny").geometry
        bench_case("tiny", geo.height, geo.width, geo.frames_per_shot, args.shots, args.repeats, args.device, dtype)
    if args.case in ("wan2.1", "all"):
        frames = get_preset("wan2.1-t2v-1.3b").geometry.frames_per_shot
        bench_case("wan2.1", args.height, args.width, frames, args.shots, args.repeats, args.device, dtype)


if __name__ == "__main__":
    main()
