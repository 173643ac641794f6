"""VAE streaming decode time per block against the DiT's time per block (random weights), side by side.

Cases: the tiny preset at 64x64 (the Story World) and the real Wan2.1 VAE config at a reduced but
representative size (full 480x832 on CUDA). A shot is decoded block by block with StreamingDecoder, as
the engine does; the first block is timed apart because it decodes one latent frame fewer pixels.
The DiT column is one block of the causal student at the same latent size: its few denoising passes plus
the cache-refresh pass (run after the block's frames are out), attending to 6 context frames; for the
wan2.1 case the 1.3B DiT is built with --dit-layers layers and scaled to its 30 (per-layer cost is uniform). Time to first frame = global cache
fill + first block's denoising passes + first block's decode, so the ratio says which part dominates it.

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

import dataclasses  # noqa: E402

from shotstream_core.cache import KVCache  # noqa: E402
from shotstream_core.config import get_preset, latent_to_pixel_frames, validate_size  # noqa: E402
from shotstream_core.model import CausalWanDiT  # noqa: E402
from shotstream_core.vae import StreamingDecoder, WanVAE  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(preset: str, height: int, width: int, latent_frames: int, block_frames: int,
               device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    vae = WanVAE(preset).to(device=device, dtype=dtype).eval()
    stride = vae.config.spatial_stride
    validate_size(height, width, stride, patch=(1, 1))  # the VAE alone (bench_dit_block checks the DiT's patch)
    z = torch.randn(1, vae.config.z_dim, latent_frames, height // stride, width // stride, device=device)
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


def bench_dit_block(dit_preset: str, layers: int | None, height: int, width: int, block_frames: int,
                    device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Seconds of one streamed block's few-step passes, of its cache refresh, and of the global cache fill."""
    preset = get_preset(dit_preset)
    cfg = preset.dit if layers is None else dataclasses.replace(preset.dit, num_layers=layers)
    validate_size(height, width, patch=cfg.spatial_patch)  # on the 8x latent grid used below
    torch.manual_seed(0)
    dit = CausalWanDiT(cfg).to(device=device, dtype=dtype).eval()
    h, w, ctx = height // 8, width // 8, preset.sampler.context_frames
    tpf = cfg.tokens_per_frame(h, w)
    cache = KVCache(cfg.num_layers, 1, (ctx + block_frames) * tpf, cfg.num_heads, cfg.head_dim, dtype, device)
    text_kv = dit.encode_text(torch.randn(1, 1, 16, cfg.text_dim, device=device))
    flags = torch.tensor([[0] * ctx + [1] * block_frames], device=device)
    passes = len(preset.sampler.denoising_steps)

    def one() -> tuple[float, float, float]:
        sync(device)
        t0 = time.perf_counter()
        dit.forward_cached(torch.randn(1, cfg.in_channels, ctx, h, w, device=device, dtype=dtype),
                           torch.zeros(1, ctx, device=device), text_kv, flags[:, :ctx], cache, 0)
        sync(device)
        t1 = time.perf_counter()
        x = torch.randn(1, cfg.in_channels, block_frames, h, w, device=device, dtype=dtype)
        for _ in range(passes):
            dit.forward_cached(x, torch.full((1, block_frames), 500.0, device=device), text_kv, flags[:, ctx:], cache, ctx)
        sync(device)
        t2 = time.perf_counter()
        # the refresh: after the block's frames are out, before the next block (the engine's order)
        dit.forward_cached(x, torch.zeros(1, block_frames, device=device), text_kv, flags[:, ctx:], cache, ctx)
        sync(device)
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    with torch.inference_mode():
        one()
        fill, denoise, refresh = min(one() for _ in range(repeats))
    scale = (preset.dit.num_layers / cfg.num_layers) if layers else 1.0
    return {"dit": f"{dit_preset} ({cfg.num_layers} of {preset.dit.num_layers} layers)",
            "dit_block_ms": round((denoise + refresh) * scale * 1e3, 1),
            "dit_denoise_ms": round(denoise * scale * 1e3, 1), "dit_fill_ms": round(fill * scale * 1e3, 1),
            "scaled_from_layers": cfg.num_layers if layers else None}


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
    p.add_argument("--dit-layers", type=int, default=2, help="layers built for the 1.3B DiT (scaled to 30)")
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
        dit_preset, layers = ("tiny", None) if preset == "tiny" else ("wan2.1-t2v-1.3b", args.dit_layers)
        r.update(bench_dit_block(dit_preset, layers, h, w, args.block_frames, device, dtype, args.repeats))
        results.append(r)
        print(f"{r['case']:>7} {r['size']:>8} {r['dtype']:>8} {r['device']:>6}: "
              f"first block {r['first_block_ms']:8.1f} ms ({1 + 4 * (args.block_frames - 1)} frames), "
              f"later blocks {r['block_ms']:8.1f} ms ({4 * args.block_frames} frames), "
              f"{r['ms_per_pixel_frame']:7.2f} ms/frame, shot {r['shot_s']:.2f} s"
              + (f", peak {r['peak_mem_GB']} GB" if r["peak_mem_GB"] is not None else ""), flush=True)
        # the first block's frames wait for the cache fill, its denoising passes and its decode (not its refresh)
        first_frame = r["dit_fill_ms"] + r["dit_denoise_ms"] + r["first_block_ms"]
        print(f"{'':>17} DiT {r['dit']}: block {r['dit_block_ms']:8.1f} ms, cache fill {r['dit_fill_ms']:.1f} ms; "
              f"decode/DiT per block = {r['block_ms'] / r['dit_block_ms']:.2f}; time to first frame "
              f"{first_frame:.0f} ms, of which decode {r['first_block_ms'] / first_frame:.0%} -> "
              f"{'decode' if r['first_block_ms'] > r['dit_fill_ms'] + r['dit_denoise_ms'] else 'the DiT'} dominates",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
