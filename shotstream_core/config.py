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
# Wan2.1's DiT patch: one latent frame by 2x2 latent cells a token. Its spatial part is the default of
# ShotGeometry.dit_patch, which follows the DiT a model runs with.
WAN_PATCH_SIZE = (1, 2, 2)


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
    patch_size: tuple[int, int, int] = WAN_PATCH_SIZE
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
    # A learned vector (coded_alone, zero at the start) added to the timestep embedding of the latent frames
    # the VAE codes alone (one pixel frame through its single-frame path, where the others code four): the
    # global-context frames and the shot's first, at temporal positions 0..coded_alone_frames-1 (so it is
    # the sampler's context_frames + 1). Wan has none: a frame finds it is a shot's first only through
    # attention. 0 = off (every preset; docs/EXPERIMENTS.md has what it did for the tiny model).
    coded_alone_frames: int = 0

    def __post_init__(self):
        if self.coded_alone_frames < 0:
            raise ValueError(f"coded_alone_frames must be >= 0 (0 = off), got {self.coded_alone_frames}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.patch_size[0] != 1:
            raise ValueError("temporal patch size must be 1 (one latent frame per token row)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def spatial_patch(self) -> tuple[int, int]:
        """Latent cells a token spans, (height, width)."""
        return tuple(self.patch_size[1:])

    def tokens_per_frame(self, latent_height: int, latent_width: int) -> int:
        ph, pw = self.spatial_patch
        return (latent_height // ph) * (latent_width // pw)


@dataclass(frozen=True)
class ShotGeometry:
    """Pixel size and length of one shot, the VAE's spatial stride that sets its latent grid, and the DiT's
    patch that tiles that grid into tokens (the size must suit both)."""

    height: int = 480
    width: int = 832
    frames_per_shot: int = 81
    fps: int = 16
    spatial_stride: int = VAE_SPATIAL_STRIDE  # pixels per latent cell a side: the engine sets it from its VAE
    # Latent cells per token, (height, width): the engine sets it from its DiT. Saved states without it
    # were all made under Wan's rule, so they read back with Wan's patch.
    dit_patch: tuple[int, int] = WAN_PATCH_SIZE[1:]

    def __post_init__(self):
        object.__setattr__(self, "dit_patch", tuple(self.dit_patch))  # a list when read back from JSON
        validate_size(self.height, self.width, self.spatial_stride, self.dit_patch)
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
    # Latent frames of a shot's first block; None: block_frames, as in the reference. A student trained
    # with 1 draws its first latent frame alone, so the frames after it lean on a finished frame, as later
    # blocks do (Self-Forcing's independent first frame). A student file records its own (loading.py).
    first_block_frames: int | None = None
    context_frames: int = 6  # latent frames of global (earlier-shot) context
    rope_shot_phase: float = 1.0 / 6.0  # radians added to temporal angles per unit of shot flag

    def __post_init__(self):
        for name in ("block_frames", "first_block_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 latent frame, got {value}")

    def block_spans(self, frames: int) -> list[tuple[int, int]]:
        """[(f0, f1)] latent-frame ranges of a shot's blocks, in order; the last may be shorter."""
        if frames <= 0:
            return []
        first = min(self.first_block_frames or self.block_frames, frames)
        starts = [0] + list(range(first, frames, self.block_frames))
        return [(f0, min(f0 + (first if i == 0 else self.block_frames), frames)) for i, f0 in enumerate(starts)]

    def block_ids(self, frames: int):
        """LongTensor [frames]: the block each latent frame of a shot belongs to."""
        import torch

        ids = torch.empty(frames, dtype=torch.long)
        for b, (f0, f1) in enumerate(self.block_spans(frames)):
            ids[f0:f1] = b
        return ids


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


def validate_size(height: int, width: int, spatial_stride: int = VAE_SPATIAL_STRIDE,
                  patch: tuple[int, int] = WAN_PATCH_SIZE[1:]) -> None:
    """Refuse a frame size that the VAE (`spatial_stride` pixels a latent cell) and the DiT (`patch`: latent
    cells a token, (height, width)) cannot tile. Patch (1, 1) checks the VAE alone."""
    if spatial_stride < 1 or spatial_stride & (spatial_stride - 1):
        raise ValueError(f"the VAE's spatial stride must be a power of 2, got {spatial_stride}")
    ph, pw = patch
    if ph < 1 or pw < 1:
        raise ValueError(f"the DiT's patch must be at least 1x1, got {ph}x{pw}")
    mh, mw = spatial_stride * ph, spatial_stride * pw
    hints = []
    for name, size, multiple in (("height", height, mh), ("width", width, mw)):
        if size < multiple or size % multiple:
            lower = max(multiple, size // multiple * multiple)
            hints.append(f"{name} {size} -> {lower} or {lower + multiple}")
    if not hints:
        return
    rule = f"size must be divisible by {mh}" if mh == mw else f"height must be divisible by {mh} and width by {mw}"
    if ph == pw == 1:  # a 1x1 patch adds nothing to the VAE's rule
        why = f"VAE stride {spatial_stride}"
    elif ph == pw:
        why = f"VAE stride {spatial_stride} x DiT patch {ph}"
    else:
        why = f"VAE stride {spatial_stride} x DiT patch {ph}x{pw}, height x width"
    raise ValueError(f"{rule} ({why}); nearest valid: {', '.join(hints)}")


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
