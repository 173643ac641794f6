"""Training step time in fp32 against bf16 autocast, side by side, for the tiny VAE and the tiny teacher DiT.

Why: `bf16: true` autocasts on the CPU too where it has native bf16 (training/common.py). Whether that pays
depends on the CPU (oneDNN uses AMX tiles where the CPU has them, and emulates bf16, far slower, where it
has neither AMX-BF16 nor AVX512-BF16) and on the model: convolutions with many pixels gain, small matmuls
lose to the casts. This prints both so a config choice rests on a measurement. The two
precisions alternate within every repeat, so machine noise hits both alike.

    python bench/bench_train_precision.py                 # CPU, torch's default threads
    python bench/bench_train_precision.py --threads 2 --repeats 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shotstream_core.config import get_preset  # noqa: E402
from shotstream_core.model import WanDiT  # noqa: E402
from shotstream_core.vae import WanVAE  # noqa: E402
from training.common import native_bf16  # noqa: E402
from training.vae_stage import VAEAutoencoder  # noqa: E402


def vae_step(preset, batch: int, clip_frames: int, decoder_only: bool = False):
    """One VAE training step (encode, decode, L2, backward) on whole frames of the preset's size;
    decoder_only: the encoder frozen (no grad), as in the decoder-only phases (train_part: decoder)."""
    geo = preset.geometry
    ae = VAEAutoencoder(WanVAE(preset.vae), sample_latent=False, frozen_encoder=decoder_only)
    clip = torch.rand(batch, 3, clip_frames, geo.height, geo.width) * 2 - 1
    eps = torch.zeros(batch, ae.vae.config.z_dim, (clip_frames - 1) // 4 + 1, geo.latent_height, geo.latent_width)

    def step(bf16: bool) -> None:
        ae.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            recon = ae(clip, eps)[0]
        ((recon.float() - clip) ** 2).mean().backward()
    return step


def teacher_step(preset, batch: int):
    """One teacher training step: [context | shot] latents, one t per sample, per-shot prompts."""
    dit, geo, sampler = preset.dit, preset.geometry, preset.sampler
    model = WanDiT(dit)
    frames = sampler.context_frames + geo.latent_frames
    seq = torch.randn(batch, dit.in_channels, frames, geo.latent_height, geo.latent_width)
    t = torch.rand(batch) * sampler.num_train_timesteps
    text = torch.randn(batch, 2, dit.text_len, dit.text_dim)
    flags = torch.zeros(batch, frames, dtype=torch.long)
    flags[:, sampler.context_frames:] = 1
    prompt_ids = flags.clone()

    def step(bf16: bool) -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = model(seq, t, text, flags, prompt_ids, shot_phase=sampler.rope_shot_phase)
        v.float().square().mean().backward()
    return step


def time_alternating(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each named call; the calls alternate within every repeat, so machine noise
    hits all alike."""
    for call in calls.values():  # warm-up: allocator, oneDNN primitive caches
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
    return {k: median(v) for k, v in times.items()}


def time_side_by_side(step, repeats: int) -> dict[str, float]:
    return time_alternating({"fp32": lambda: step(False), "bf16": lambda: step(True)}, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--vae-batch", type=int, default=4)
    p.add_argument("--vae-frames", type=int, default=9, help="clip length (4k+1)")
    p.add_argument("--decoder-frames", type=int, default=33, help="clip length of the decoder-only step")
    p.add_argument("--dit-batch", type=int, default=16)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    preset = get_preset(a.preset)
    torch.manual_seed(0)
    cases = {
        f"VAE step ({a.vae_batch} x {a.vae_frames} frames, {preset.geometry.height}x{preset.geometry.width})":
            vae_step(preset, a.vae_batch, a.vae_frames),
        f"VAE decoder-only step (1 x {a.decoder_frames} frames)": vae_step(preset, 1, a.decoder_frames, True),
        f"teacher DiT step (batch {a.dit_batch})": teacher_step(preset, a.dit_batch),
    }
    native = native_bf16(torch.device("cpu"))
    print(f"{a.preset} preset, {torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()}), "
          f"CPU with native bf16: {native}" + ("" if native else " (training stages run fp32 here, whatever bf16 says)"))
    for name, step in cases.items():
        t = time_side_by_side(step, a.repeats)
        print(f"{name}: fp32 {t['fp32'] * 1e3:.0f} ms, bf16 autocast {t['bf16'] * 1e3:.0f} ms, "
              f"speed-up {t['fp32'] / t['bf16']:.2f}x")


if __name__ == "__main__":
    main()
