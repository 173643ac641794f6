"""Wan2.1 video VAE: causal 3-D convolutions with a feature cache, and a streaming decoder.

The module tree and parameter names follow Wan2.1's `WanVAE_` exactly (encoder.*, conv1, conv2, decoder.*),
so Wan2.1_VAE.pth and ComfyUI's wan_2.1_vae.safetensors load without renaming.

Time is causal everywhere. The encoder reads the first frame alone, then chunks of 4 frames; the decoder
turns the first latent frame into 1 pixel frame and every later latent frame into 4. Between chunks each
causal conv keeps the last frames of its input in a cache (a dict keyed by module), so decoding a shot
block by block gives the same frames as decoding it in one call.

Shapes below write s for the spatial stride, 2 ** (levels - 1): 8 for Wan2.1, another power of 2 for a
small VAE with fewer or more levels.

Latents are normalised per channel: z = (mu - latent_mean) / latent_std. The mean/std are buffers of the
module, so a trained small VAE carries its own statistics in its state dict.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import VAE_TEMPORAL_STRIDE, validate_frames, validate_size
from .files import describe_checkpoint, read_tensors

# Per-channel statistics of Wan2.1 latents (from Wan2.1's wan/modules/vae.py).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

Cache = dict  # nn.Module -> Tensor (or a marker): the causal state carried from one chunk to the next


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a Wan2.1-architecture VAE."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] | None = WAN21_LATENT_MEAN  # None: zeros (set by training)
    latent_std: tuple[float, ...] | None = WAN21_LATENT_STD  # None: ones
    # A clip's first latent frame codes one pixel frame (the single-frame path), the others four: its raw
    # latents sit elsewhere (on the tiny VAE each channel's mean about 0.5 away, its spread down to a third).
    # True: that frame is normalised with statistics of its own (buffers first_latent_mean/_std, set by
    # training), so every latent frame the DiT sees has about unit scale. Off in Wan's VAE and every preset;
    # a file shows it by those buffers.
    first_frame_stats: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsampling step ({len(self.dim_mult) - 1}), "
                f"got {len(self.temporal_downsample)}"
            )
        # Time is 4x everywhere (4k+1 frames, blocks of latent frames). Space may differ from Wan2.1's 8x: the
        # shot geometry carries the stride of the VAE it runs with (ShotGeometry.spatial_stride).
        if self.temporal_stride != VAE_TEMPORAL_STRIDE:
            raise ValueError(
                f"VAE compresses time {self.temporal_stride}x but the engine expects {VAE_TEMPORAL_STRIDE}x: use "
                f"{int(math.log2(VAE_TEMPORAL_STRIDE))} temporal downsamples"
            )
        for name in ("latent_mean", "latent_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != self.z_dim:
                    raise ValueError(f"{name} has {len(value)} values, z_dim is {self.z_dim}")
                object.__setattr__(self, name, tuple(float(v) for v in value))

    @property
    def spatial_stride(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)


VAE_PRESETS: dict[str, VAEConfig] = {
    # The real Wan2.1 VAE (127M parameters).
    "wan2.1": VAEConfig(),
    # For the 64x64 Story World: same architecture, trainable on CPU in minutes; statistics set by training.
    "tiny": VAEConfig(dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, latent_mean=None, latent_std=None),
    # Smallest sensible instance, for unit tests.
    "micro": VAEConfig(dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1, latent_mean=None, latent_std=None),
}


def get_vae_config(name: str) -> VAEConfig:
    try:
        return VAE_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}") from None


# --- building blocks ----------------------------------------------------------------------------------

# On the CPU, inference in float32 goes through oneDNN directly: for some of the VAE's small shapes
# PyTorch's conv3d falls back to its slow reference kernel (a tiny whole-clip decode measured 5x faster
# here, outputs equal to 1e-6). Training keeps PyTorch's own path (autograd, autocast) unchanged.
_ONEDNN = hasattr(torch, "mkldnn_convolution") and torch.backends.mkldnn.is_available()


def _cpu_inference(x: torch.Tensor) -> bool:
    return (_ONEDNN and torch.backends.mkldnn.enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled())


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads only the past in time: 2*p frames in front, zeros or the previous chunk's tail."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # x: [B, C, T, H, W]
        pad = self.time_pad
        if cache is not None and pad > 0:
            prev = cache.get(self)
            if prev is not None:
                x = torch.cat([prev, x], dim=2)
                pad -= prev.shape[2]
            # what the next chunk sees as its past; a copy, since a view would keep this whole chunk alive
            # until the next one (4.6 GB of Wan's decoder at 480x832) and sent the next chunk's convolutions
            # down a slow path (a tiny shot's streamed decode 700 ms against 150 ms)
            cache[self] = x[:, :, -self.time_pad:].clone()
        weight = self.weight
        if (x.shape[2] == 1 and pad == self.kernel_size[0] - 1 and pad > 0 and self.stride[0] == 1
                and not torch.is_grad_enabled()):
            # one frame after zeros only (a clip's first, coded alone): it meets just the kernel's last tap.
            # Inference only, so that training sums exactly as before
            weight, pad = weight[:, :, -1:], 0
        x = F.pad(x, self.space_pad + (max(pad, 0), 0))
        if _cpu_inference(x):
            return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), self.bias, (0, 0, 0), self.stride,
                                            self.dilation, self.groups)
        return F.conv3d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)


class RMS_norm(nn.Module):
    """Channel RMS norm (F.normalize * sqrt(C) * gamma); gamma broadcasts over [T,]H,W."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_inference(x):  # F.normalize's strided reduction is slow on the CPU; the same sum, written out
            return x * torch.rsqrt((x * x).sum(1, keepdim=True).clamp_min(1e-24)) * (self.scale * self.gamma)
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices matter: they are the parameter names (residual.0/2/3/6).
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)  # [bt, 1, hw, c]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


def _per_frame_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = module(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial (and optionally 2x temporal) down- or upsampling, causal in time."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            # Halves the channels: the decoder's next level starts from dim // 2.
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                # Predicts two frames (2*dim channels) per input frame.
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.mode == "upsample3d":
            # The first chunk (the shot's first latent frame) is not doubled in time: it becomes 1 frame.
            if self not in cache:
                cache[self] = True
            else:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache)  # [B, 2C, T, H, W], zero past before the second chunk
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = _per_frame_2d(self.resample, x)
        if self.mode == "downsample3d":
            # The first chunk passes through untouched; later chunks are strided against the frame before.
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()  # a copy: a view would keep the whole chunk alive
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], dim=2))
        return x


def _run(layers: Iterable[nn.Module], x: torch.Tensor, cache: Cache) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, AttentionBlock, Resample)) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMS_norm(top, images=False), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # x: [B, 3, T, H, W] one chunk -> [B, 2*z, t, H/s, W/s]
        x = self.conv1(x, cache)
        return _run([*self.downsamples, *self.middle, *self.head], x, cache)


class Decoder3d(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *mult[::-1])]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous Resample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        # z: [B, z, t, h, w] one chunk -> [B, 3, T, 8h, 8w]
        x = self.conv1(z, cache)
        return _run([*self.middle, *self.upsamples, *self.head], x, cache)


# --- the VAE ----------------------------------------------------------------------------------------

class WanVAE(nn.Module):
    """Wan2.1 VAE. Pixels [B, 3, F, H, W] in [-1, 1] <-> normalised latents [B, z, (F-1)/4+1, H/s, W/s]."""

    def __init__(self, config: VAEConfig | str = "wan2.1"):
        super().__init__()
        cfg = get_vae_config(config) if isinstance(config, str) else config
        self.config = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)
        mean = cfg.latent_mean if cfg.latent_mean is not None else (0.0,) * cfg.z_dim
        std = cfg.latent_std if cfg.latent_std is not None else (1.0,) * cfg.z_dim
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(std, dtype=torch.float32))
        if cfg.first_frame_stats:
            self.register_buffer("first_latent_mean", torch.zeros(cfg.z_dim))
            self.register_buffer("first_latent_std", torch.ones(cfg.z_dim))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _stats(self, like: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, std) shaped [1, z, f, 1, 1] for latents `like` [B, z, f, h, w]; `first`: its
        frame 0 is a clip's first (coded alone), which takes first_latent_* where the VAE has them."""
        mean = self.latent_mean.view(1, -1, 1, 1, 1).to(like)
        std = self.latent_std.view(1, -1, 1, 1, 1).to(like)
        if not (first and self.config.first_frame_stats):
            return mean, std
        rest = like.shape[2] - 1
        mean = torch.cat([self.first_latent_mean.view(1, -1, 1, 1, 1).to(like), mean.expand(-1, -1, rest, -1, -1)], 2)
        std = torch.cat([self.first_latent_std.view(1, -1, 1, 1, 1).to(like), std.expand(-1, -1, rest, -1, -1)], 2)
        return mean, std

    def normalize(self, mu: torch.Tensor, first: bool = True) -> torch.Tensor:
        """Raw encoder means [B, z, f, h, w] -> normalised latents; `first`: frame 0 starts a clip."""
        mean, std = self._stats(mu, first)
        return (mu - mean) / std

    def denormalize(self, z: torch.Tensor, first: bool = True) -> torch.Tensor:
        mean, std = self._stats(z, first)
        return z * std + mean

    # encode ---------------------------------------------------------------------------------------

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, F, H, W] in [-1, 1] -> raw (unnormalised) posterior (mu, log_var), each
        [B, z, (F-1)//4+1, H/s, W/s], in the VAE's dtype. For training; inference uses `encode`."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects video [B, 3, F, H, W], got shape {tuple(video.shape)}")
        _, _, frames, height, width = video.shape
        validate_size(height, width, self.config.spatial_stride, patch=(1, 1))  # the VAE alone: no DiT patch
        validate_frames(frames)
        x = video.to(self.device, self.dtype)
        cache: Cache = {}
        stride = self.config.temporal_stride
        # First frame alone, then chunks of `stride` frames, as Wan trains and encodes.
        chunks = [x[:, :, :1]] + [x[:, :, i:i + stride] for i in range(1, frames, stride)]
        h = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        mu, log_var = self.conv1(h).chunk(2, dim=1)
        return mu, log_var

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised latent mean [B, z, (F-1)//4+1, H/s, W/s] (float32)."""
        return self.normalize(self.encode_moments(video)[0].float())

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Each frame encoded alone as a one-frame clip: [N, 3, H, W] -> [N, z, H/s, W/s]."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"encode_frames expects frames [N, 3, H, W], got shape {tuple(frames.shape)}")
        return self.encode(frames.unsqueeze(2))[:, :, 0]

    # decode ---------------------------------------------------------------------------------------

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim:
            raise ValueError(
                f"expected latents [B, {self.config.z_dim}, F, h, w], got shape {tuple(z.shape)}"
            )
        # No size check: every h x w latent grid decodes (to stride-times-larger frames).

    def _decode_chunks(self, z: torch.Tensor, cache: Cache, first: bool, chunk_frames: int,
                       clamp: bool = True) -> torch.Tensor:
        """Decode normalised latents [B, z, f, h, w] continuing from `cache`; `first`: z starts a shot."""
        x = self.conv2(self.denormalize(z.to(self.device, self.dtype), first))
        bounds = [0, 1] if first else [0]  # the shot's first latent frame is decoded alone
        bounds += list(range(bounds[-1] + chunk_frames, x.shape[2], chunk_frames))
        bounds = sorted(set(bounds + [x.shape[2]]))
        out = [self.decoder(x[:, :, a:b], cache) for a, b in zip(bounds[:-1], bounds[1:])]
        video = torch.cat(out, dim=2).float()
        return video.clamp(-1.0, 1.0) if clamp else video

    def decode(self, latents: torch.Tensor, chunk_frames: int = 1, clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B, z, f, h, w] -> video [B, 3, 4(f-1)+1, 8h, 8w] in [-1, 1] (float32).

        chunk_frames: latent frames per decoder call after the first (1 as Wan: least memory).
        clamp: False for training (keeps gradients of pixels that overshoot [-1, 1]).
        """
        self._check_latents(latents)
        return self._decode_chunks(latents, {}, first=True, chunk_frames=chunk_frames, clamp=clamp)


class StreamingDecoder:
    """Decodes a shot block by block, carrying the causal cache across blocks.

    Lifecycle: reset() (also done at construction) -> feed(block) ... -> finish(). The first latent frame
    of a shot yields 1 pixel frame, each later one 4; the frames concatenated over all feeds equal
    `vae.decode` of the whole shot.
    """

    def __init__(self, vae: WanVAE, chunk_frames: int = 1):
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        self.vae = vae
        self.chunk_frames = chunk_frames
        self.reset()

    def reset(self) -> None:
        """Start a new shot."""
        self._cache: Cache | None = {}
        self._shape: tuple[int, int, int] | None = None  # (B, h, w) of the shot
        self.latent_frames = 0
        self.pixel_frames = 0

    @torch.no_grad()
    def feed(self, latent_block: torch.Tensor) -> torch.Tensor:
        """[B, z, f, h, w] normalised latents -> pixel frames [B, 3, n, 8h, 8w] in [-1, 1]."""
        if self._cache is None:
            raise RuntimeError("StreamingDecoder.feed after finish(): call reset() to start a new shot")
        self.vae._check_latents(latent_block)
        shape = (latent_block.shape[0], *latent_block.shape[-2:])
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"block of (batch, h, w) = {shape} does not continue the shot's {self._shape}")
        self._shape = shape
        frames = self.vae._decode_chunks(latent_block, self._cache, self.latent_frames == 0, self.chunk_frames)
        self.latent_frames += latent_block.shape[2]
        self.pixel_frames += frames.shape[2]
        return frames

    def finish(self) -> int:
        """End the shot and free the cache; returns the number of pixel frames decoded."""
        self._cache = None
        return self.pixel_frames


# --- loading ----------------------------------------------------------------------------------------

_WAN_VAE_MARKER = "decoder.middle.0.residual.0.gamma"
_STRIP_PREFIXES = ("first_stage_model.", "vae.", "model.")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STRIP_PREFIXES:
        if prefix + _WAN_VAE_MARKER in sd:
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def vae_config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """Infer dim, z_dim, dim_mult, res blocks and temporal downsampling from Wan-layout VAE tensor shapes."""
    dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    levels: list[list[int]] = [[]]  # output channels of the residual blocks of each level
    temporal: list[bool] = []
    i = 0
    while True:
        prefix = f"encoder.downsamples.{i}."
        if prefix + "residual.2.weight" in sd:
            levels[-1].append(sd[prefix + "residual.2.weight"].shape[0])
        elif prefix + "resample.1.weight" in sd:
            temporal.append(prefix + "time_conv.weight" in sd)
            levels.append([])
        else:
            break
        i += 1
    if not levels[0] or any(len(lv) != len(levels[0]) for lv in levels):
        raise ValueError("VAE encoder blocks are not laid out as Wan's (equal residual blocks per level)")
    dim_mult = tuple(lv[-1] // dim for lv in levels)
    base = VAEConfig(dim=dim, z_dim=z_dim, dim_mult=dim_mult, num_res_blocks=len(levels[0]),
                     temporal_downsample=tuple(temporal), latent_mean=None, latent_std=None)
    wan = VAE_PRESETS["wan2.1"]
    if z_dim == wan.z_dim and base.replace(latent_mean=wan.latent_mean, latent_std=wan.latent_std) == wan:
        base = wan  # the real Wan2.1 VAE: its published latent statistics
    return base.replace(first_frame_stats="first_latent_mean" in sd)


def vae_signature(vae: "WanVAE") -> str:
    """What identifies a VAE's weights whatever file holds them (Wan2.1_VAE.pth in fp32, ComfyUI's fp16
    safetensors): each weight tensor's mean absolute value to 4 significant digits, by name (JSON)."""
    stats = {name: float(f"{t.detach().double().abs().mean().item():.4g}")
             for name, t in sorted(vae.state_dict().items()) if name.endswith("weight") and t.numel()}
    return json.dumps(stats, separators=(",", ":"))


def same_weights(signature_a: str, signature_b: str, rel: float = 2e-3) -> bool:
    """Whether two vae_signature()s describe the same weights (up to a file's dtype and the rounding)."""
    try:
        a, b = json.loads(signature_a), json.loads(signature_b)
    except (TypeError, ValueError):
        return False
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rel * max(abs(a[k]), abs(b[k]), 1e-12) for k in a)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
    """Load Wan2.1_VAE.pth, ComfyUI's vae/wan_2.1_vae.safetensors, or a VAE saved by this project; a Wan2.1
    model folder means the Wan2.1_VAE.pth in it (its .safetensors are the DiT's)."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("Wan2.1_VAE.pth")) or sorted(path.glob("*[Vv][Aa][Ee]*.pth")) \
            or sorted(path.glob("*[Vv][Aa][Ee]*.safetensors"))
        if not found:
            raise ValueError(f"{path} is a folder with no VAE file in it (expected Wan2.1_VAE.pth): give the file")
        path = found[0]
    sd = _strip_prefix(read_tensors(path))
    if _WAN_VAE_MARKER not in sd or "encoder.conv1.weight" not in sd or "conv2.weight" not in sd:
        raise ValueError(
            f"{Path(path).name} is not a Wan2.1 VAE: found {describe_checkpoint(sd)}; expected a Wan2.1 VAE "
            f"(Wan2.1_VAE.pth or ComfyUI vae/wan_2.1_vae.safetensors, keys like '{_WAN_VAE_MARKER}')"
        )
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:
        raise ValueError(f"{Path(path).name} is a Wan2.2 VAE (48 channels); ShotStream needs the Wan2.1 VAE")
    cfg = vae_config_from_state_dict(sd)
    with torch.device("meta"):
        vae = WanVAE(cfg)
    expected = vae.state_dict()
    optional = {"latent_mean", "latent_std"}  # absent from Wan's own files
    stats = optional | {"first_latent_mean", "first_latent_std"}  # statistics stay float32
    missing = sorted(set(expected) - set(sd) - optional)
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or bad_shape:
        raise ValueError(
            f"{Path(path).name} does not match a Wan2.1 VAE of {cfg}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {bad_shape[:5]}"
        )
    state = {k: sd[k].to(dtype=torch.float32 if k in stats else dtype) for k in expected if k in sd}
    if optional - set(sd):
        # Wan's files carry no statistics: the wan2.1 config supplies Wan's, anything else gets 0/1.
        if cfg.latent_mean is None:
            warnings.warn(f"{Path(path).name} has no latent_mean/latent_std; using 0/1 per channel "
                          f"(train the VAE's latent statistics and save them with the weights)")
        state["latent_mean"] = torch.tensor(cfg.latent_mean or (0.0,) * cfg.z_dim, dtype=torch.float32)
        state["latent_std"] = torch.tensor(cfg.latent_std or (1.0,) * cfg.z_dim, dtype=torch.float32)
    vae.load_state_dict(state, assign=True)
    return vae.to(device).eval().requires_grad_(False)
