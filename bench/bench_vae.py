"""VAE streaming decode time per block (random weights).

Cases: the tiny preset at 64x64 (the Story World) and the real Wan2.1 VAE config at a reduced but
representative size (full 480x832 on CUDA). A shot is decoded block by block with StreamingDecoder, as
the engine does; the first block is timed apart because it decodes one latent frame fewer pixels.

    python bench/bench_vae.py                       # both cases, CPU
    python bench/bench_vae.py --device cuda --dtype bf16
    python bench/bench_vae.py --case wan2.1 --height 480 --width 832 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shotstream_core.config import latent_to_pixel_frames, validate_size  # noqa: E402
from shotstream_core.vae import StreamingDecoder, WanVAE  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(preset: str, height: int, width: int, latent_frames: int, block_frames: int,
               device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    validate_size(height, width)
    torch.manual_seed(0)
    vae = WanVAE(preset).to(device=device, dtype=dtype).eval()
    z = torch.randn(1, vae.config.z_dim, latent_frames, height // 8, width // 8, device=device)
    blocks = [z[:, :, i:i + block_frames] for i in range(0, latent_frames, block_frames)]
    dec = StreamingDecoder(vae)

    def one_shot() -> list[float]:
        dec.reset()
        times = []
        for b in blocks:
            sync(device)
            t0 = time.perf_counter()
            dec.feed(b)
            sync(device)
            times.append(time.perf_counter() - t0)
        dec.finish()
        return times

    one_shot()  # warm-up (allocator, kernels)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [one_shot() for _ in range(repeats)]
    first = min(r[0] for r in runs)
    later = min(sum(r[1:]) / max(1, len(r) - 1) for r in runs) if len(blocks) > 1 else float("nan")
    pixel_frames = latent_to_pixel_frames(latent_frames)
    shot = min(sum(r) for r in runs)
    return {
        "case": preset, "size": f"{height}x{width}", "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "params_M": round(sum(p.numel() for p in vae.parameters()) / 1e6, 2),
        "latent_frames": latent_frames, "block_frames": block_frames, "blocks": len(blocks),
        "first_block_ms": round(first * 1e3, 1),
        "block_ms": round(later * 1e3, 1),
        "ms_per_pixel_frame": round(shot * 1e3 / pixel_frames, 2),
        "shot_s": round(shot, 3),
        "peak_mem_GB": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["tiny", "wan2.1", "all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--height", type=int, default=None, help="wan2.1 case height (default 480 CUDA / 96 CPU)")
    p.add_argument("--width", type=int, default=None, help="wan2.1 case width (default 832 CUDA / 160 CPU)")
    p.add_argument("--latent-frames", type=int, default=None, help="latent frames per shot (default 9 tiny, 21 wan2.1 CUDA, 6 CPU)")
    p.add_argument("--block-frames", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)

    cases = []
    if args.case in ("tiny", "all"):
        cases.append(("tiny", 64, 64, args.latent_frames or 9))
    if args.case in ("wan2.1", "all"):
        cases.append(("wan2.1", args.height or (480 if cuda else 96), args.width or (832 if cuda else 160),
                      args.latent_frames or (21 if cuda else 6)))

    results = []
    for preset, h, w, f in cases:
        r = bench_case(preset, h, w, f, args.block_frames, device, dtype, args.repeats)
        results.append(r)
        print(f"{r['case']:>7} {r['size']:>8} {r['dtype']:>8} {r['device']:>6}: "
              f"first block {r['first_block_ms']:8.1f} ms ({1 + 4 * (args.block_frames - 1)} frames), "
              f"later blocks {r['block_ms']:8.1f} ms ({4 * args.block_frames} frames), "
              f"{r['ms_per_pixel_frame']:7.2f} ms/frame, shot {r['shot_s']:.2f} s"
              + (f", peak {r['peak_mem_GB']} GB" if r["peak_mem_GB"] is not None else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
