"""Model and generation configs, with size presets.

Everything downstream derives shapes from these objects: never hard-code resolution, frame counts,
layers, heads or tokens per frame elsewhere.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Wan2.1 VAE compression: 4x in time (first frame alone), 8x8 in space. Time is fixed; space is the default
# of ShotGeometry.spatial_stride, which follows the VAE a model runs with.
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a Wan2.1 diffusion transformer."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # A fixed 2-D sin-cos position added to the patch tokens (DiT's). Wan has none: RoPE is relative, so a
    # model finds where a token sits only from the grid's edges, through attention. Off in every preset
    # (docs/EXPERIMENTS.md has what it did for the tiny teacher). Not a weight: kept in file metadata.
    absolute_position: bool = False
    # The prompt's mean token feature, embedded and added to the timestep embedding, so that it modulates
    # every token (the pooled text vector of SD3 and PixArt's adaLN). Wan has only cross-attention. Off in
    # every preset (docs/EXPERIMENTS.md has what it did for the tiny teacher). Its weights (text_pool.*) show
    # it in a file.
    pooled_text: bool = False

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 (one latent frame per token row)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        ph, pw = self.patch_size[1], self.patch_size[2]
        return (latent_height // ph) * (latent_width // pw)


@dataclass(frozen=True)
class ShotGeometry:
    """Pixel size and length of one shot, and the VAE's spatial stride that sets its latent grid."""

    height: int = 480
    width: int = 832
    frames_per_shot: int = 81
    fps: int = 16
    spatial_stride: int = VAE_SPATIAL_STRIDE  # pixels per latent cell a side: the engine sets it from its VAE

    def __post_init__(self):
        validate_size(self.height, self.width, self.spatial_stride)
        validate_frames(self.frames_per_shot)

    @property
    def latent_frames(self) -> int:
        return pixel_to_latent_frames(self.frames_per_shot)

    @property
    def latent_height(self) -> int:
        return self.height // self.spatial_stride

    @property
    def latent_width(self) -> int:
        return self.width // self.spatial_stride

    def replace(self, **changes) -> "ShotGeometry":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step causal sampling and the dual-cache layout."""

    # Raw few-step list, warped through the shifted schedule (schedule.py): with shift 8, t = 1000, 957.9,
    # 888.9, 737.6. For any shift these are steps 0, 13, 25, 37 of the teacher's 50-step grid (ODE pairs).
    denoising_steps: tuple[int, ...] = (1000, 740, 500, 260)
    shift: float = 8.0
    num_train_timesteps: int = 1000
    block_frames: int = 3  # latent frames denoised together
    context_frames: int = 6  # latent frames of global (earlier-shot) context
    rope_shot_phase: float = 1.0 / 6.0  # radians added to temporal angles per unit of shot flag


@dataclass(frozen=True)
class Preset:
    name: str
    dit: DiTConfig
    geometry: ShotGeometry
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    vae: str = "wan2.1"  # key into shotstream_core.vae.VAE_PRESETS
    text_encoder: str = "umt5-xxl"  # "umt5-xxl" | "minilm" | "random"


def pixel_to_latent_frames(pixel_frames: int) -> int:
    validate_frames(pixel_frames)
    return (pixel_frames - 1) // VAE_TEMPORAL_STRIDE + 1


def latent_to_pixel_frames(latent_frames: int) -> int:
    return (latent_frames - 1) * VAE_TEMPORAL_STRIDE + 1


def validate_frames(pixel_frames: int) -> None:
    if pixel_frames < 1 or (pixel_frames - 1) % VAE_TEMPORAL_STRIDE:
        lower = max(1, (pixel_frames - 1) // VAE_TEMPORAL_STRIDE * VAE_TEMPORAL_STRIDE + 1)
        upper = lower + VAE_TEMPORAL_STRIDE
        raise ValueError(
            f"frames per shot must be of the form 4k+1 (the VAE keeps the first frame alone, then packs 4); "
            f"got {pixel_frames}, use {lower} or {upper}"
        )


def validate_size(height: int, width: int, spatial_stride: int = VAE_SPATIAL_STRIDE, patch: int = 2) -> None:
    if spatial_stride < 1 or spatial_stride & (spatial_stride - 1):
        raise ValueError(f"the VAE's spatial stride must be a power of 2, got {spatial_stride}")
    multiple = spatial_stride * patch
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v < multiple or v % multiple]
    if bad:
        hints = ", ".join(
            f"{n} {v} -> {max(multiple, v // multiple * multiple)} or {max(multiple, v // multiple * multiple) + multiple}"
            for n, v in bad
        )
        raise ValueError(
            f"size must be divisible by {multiple} (VAE stride {spatial_stride} x DiT patch {patch}); "
            f"nearest valid: {hints}"
        )


# --- presets ---------------------------------------------------------------------------------------

def wan_1_3b() -> Preset:
    return Preset("wan2.1-t2v-1.3b", DiTConfig(), ShotGeometry(480, 832, 81, 16))


def wan_14b() -> Preset:
    dit = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
    return Preset("wan2.1-t2v-14b", dit, ShotGeometry(480, 832, 81, 16))


def tiny() -> Preset:
    """The embedded default, trained on the Story World (64x64, 33 frames: 9 latent frames, 3 blocks)."""
    dit = DiTConfig(dim=128, ffn_dim=384, num_heads=2, num_layers=4, freq_dim=64, text_dim=384, text_len=48)
    # Shift 8 suits Wan's 21x60x104 latents; 9x8x8 latents lose their content at far lower noise, so shift 8
    # would spend almost every training draw and sampling step where nothing is left to see (the
    # resolution-dependent shift of SD3, sec. 5.3.2). Shift 1: sigma = t / 1000, steps 1000/740/500/260.
    sampler = SamplerConfig(shift=1.0)
    return Preset("tiny", dit, ShotGeometry(64, 64, 33, 16), sampler, vae="tiny", text_encoder="minilm")


def micro() -> Preset:
    """For unit tests: a few thousand parameters, 32x32 pixels, 2 blocks a shot."""
    dit = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16)
    return Preset("micro", dit, ShotGeometry(32, 32, 21, 16), vae="micro", text_encoder="random")


PRESETS = {p().name: p for p in (wan_1_3b, wan_14b, tiny, micro)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
