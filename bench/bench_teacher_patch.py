"""Teacher training step with the preset's DiT patch against a finer one, side by side.

Why: the tiny preset's 64x64 frames go through the 8x VAE and a 2x2 patch to a 4x4 token grid a frame
(16x16 pixels a token), and its teachers draw places but not characters (docs/EXPERIMENTS.md). A 1x1 patch
gives 8x8 tokens; this prints what a training step costs at each, so the choice rests on a measurement.
The patch sizes alternate within every repeat, so machine noise hits both alike.

    python bench/bench_teacher_patch.py --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_precision import teacher_step, time_alternating  # noqa: E402
from shotstream_core.config import get_preset  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--patch", type=int, default=1, help="spatial patch to compare with the preset's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = get_preset(a.preset)
    geo = preset.geometry
    finer = dataclasses.replace(preset, dit=dataclasses.replace(preset.dit, patch_size=(1, a.patch, a.patch)))
    torch.manual_seed(0)
    steps = {}
    for name, pr in (("preset", preset), ("finer", finer)):
        ph, pw = pr.dit.patch_size[1:]
        grid = f"{geo.latent_height // ph}x{geo.latent_width // pw}"
        steps[f"patch {ph}x{pw} ({grid} tokens a frame)"] = teacher_step(pr, a.batch)
    med = time_alternating({name: (lambda s=step: s(False)) for name, step in steps.items()}, a.repeats)
    print(f"{a.preset} preset, teacher step (forward + backward, fp32, batch {a.batch}), "
          f"{torch.get_num_threads()} threads, median of {a.repeats}:")
    base = next(iter(med.values()))
    for name, t in med.items():
        print(f"  {name}: {t * 1e3:.0f} ms, {t / base:.2f}x the preset's")


if __name__ == "__main__":
    main()
