"""Reading checkpoint files safely, writing them atomically, and naming what a wrong file is.

Every loader (DiT, VAE, text encoders) reads through `read_tensors`: safetensors, or torch files with
weights_only=True, so loading never runs pickled code. Every weights file is written through
`save_tensors` / `copy_file`: to a temporary file in the same folder, then renamed over the target.
safetensors maps files into memory, so rewriting a file in place would crash (SIGBUS) any process that
has it open (a ComfyUI host, a running training stage); a rename leaves their copy intact.
"""
from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _new_file_mode() -> int:
    """The mode a plain open() gives a new file: 0o666 less the process's umask."""
    try:  # read the umask without changing it (os.umask would, for every thread of a host, for a moment)
        umask = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def _replace_atomically(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, _new_file_mode())  # safetensors writes 0600: others sharing the folder could not read it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file at path, replaced atomically (readers that have the old file mapped keep it)."""
    return _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def copy_file(src: str | Path, dst: str | Path) -> Path:
    """Copy src over dst atomically (see save_tensors)."""
    return _replace_atomically(dst, lambda tmp: shutil.copy2(src, tmp))


class ModelLoadError(ValueError):
    """A file that cannot be used: the message names the file and what was expected."""


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors / .pt / .pth file, or of a folder of .safetensors shards."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("diffusion_pytorch_model*.safetensors")) or sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{path} has no .safetensors weights (expected diffusion_pytorch_model*.safetensors)")
        sd = {}
        for f in files:
            sd.update(read_tensors(f))
        return sd
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # mmap (no copy of a large file in memory) needs the zip format; older torch.save files load whole
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except SafetensorError as e:
        raise ModelLoadError(f"{path.name} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    except pickle.UnpicklingError as e:
        raise ModelLoadError(
            f"{path.name} is a pickle that needs code to load; ShotStream only loads tensors "
            f"(safetensors, or torch.save of plain tensor dicts): {str(e).splitlines()[0]}") from None
    except (RuntimeError, KeyError, EOFError, ValueError) as e:  # what torch raises on bytes that are no checkpoint
        raise ModelLoadError(f"{path.name} could not be read as a torch checkpoint (truncated or not a checkpoint?): "
                             f"{type(e).__name__}: {e}") from None
    return _unwrap(obj, path)


# Where training checkpoints nest their weights, in order: the reference's LoRA checkpoints hold
# {"generator_lora": ..., "critic_lora": ...}, its full ones {"generator": ..., "fake_score": ..., optimiser}.
NESTED_WEIGHTS = ("generator_lora", "generator", "generator_ema", "state_dict", "model")


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in NESTED_WEIGHTS:
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        found = ", ".join(repr(k) for k in list(obj)[:6]) or "none"
        raise ModelLoadError(f"{path.name} holds no tensors at its top level or under {', '.join(NESTED_WEIGHTS)} "
                             f"(its keys: {found}); save the weights as one tensor dict, or under one of those keys")
    raise ModelLoadError(f"{path.name} holds no tensor dict (found {type(obj).__name__})")


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def dequantize_scaled_fp8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled" fp8 files store fp8(W / s) with s beside it (key scale_weight, or weight_scale):
    W = fp8 weight * s, as float32. Other tensors pass through; the scale keys themselves are dropped."""
    if not any(v.dtype in _FP8 for v in sd.values()):
        return sd
    out = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".weight_scale", ".scale_input", ".input_scale",
                                                ".comfy_quant")):
            continue
        if value.dtype in _FP8:
            module = key[: -len("weight")] if key.endswith("weight") else key + "."
            scale = sd.get(module + "scale_weight", sd.get(module + "weight_scale"))
            value = value.float() * (scale.float() if scale is not None else 1.0)
        out[key] = value
    return out


def describe_checkpoint(keys: Iterable[str]) -> str:
    """A short guess of what a checkpoint is, for error messages."""
    keys = set(keys)

    def has(fragment: str) -> bool:
        return any(fragment in k for k in keys)

    if has("self_attn.norm_q") and has("cross_attn"):
        return "a Wan diffusion transformer (DiT)"
    if has("SelfAttention.relative_attention_bias") or has("pos_embedding.embedding.weight") or "shared.weight" in keys \
            or has("token_embedding"):
        return "a T5 / umT5 text encoder"
    if has("embeddings.word_embeddings"):
        return "a BERT-style text encoder"
    if has("decoder.upsamples.0.upsamples.0.residual"):
        return "a Wan2.2 VAE (48 latent channels)"
    if has("decoder.conv_in.") or has("decoder.up_blocks."):
        return "a VAE in diffusers layout"
    if has("encoder.") and has("decoder."):
        return "a VAE (encoder/decoder keys)"
    if has("lora_A") or has("lora_down"):
        return "a LoRA (merge it into a DiT with the LoRA option instead)"
    sample = ", ".join(sorted(keys)[:3])
    return f"an unrecognised checkpoint ({len(keys)} tensors, e.g. {sample})"
