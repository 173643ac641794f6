"""VAE stage: train the small Wan2.1-architecture VAE on Story World frames, then set its latent statistics.

    python -m training.vae_stage --config training/configs/tiny-vae.yaml

The VAE is trained as Wan trains it, causally: a clip of 4k+1 frames is encoded as its first frame alone
and then chunks of 4, and decoded latent frame by latent frame with the causal cache. Loss: L1 + L2
reconstruction (optionally weighted towards detail: edges and small objects) + a small KL on
(mu, log_var). Clips are random spatial crops (cheap steps) or whole frames (crop 0); crops alone leave
the decoder's per-frame attention unused to the full latent grid, so a curriculum ends on whole shots.

A schedule of phases (config key `phases`: a list of overrides, each with a name) runs them in order in
OUT/<name>/, each starting from the previous phase's weights, and ends with OUT/vae.safetensors: curricula
such as short crops first, then whole shots, then the decoder alone, are one command and one config.

Afterwards the per-channel mean/std of the encoder's mu over training shots go into the VAE's
latent_mean / latent_std buffers, so normalised latents have about unit scale for the DiT.
Output: OUT/vae.safetensors (loadable by shotstream_core.vae.load_vae), OUT/recon.png, OUT/done.json.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from shotstream_core.config import VAE_TEMPORAL_STRIDE, get_preset, validate_frames
from shotstream_core.files import copy_file, save_tensors
from shotstream_core.vae import VAEConfig, WanVAE, get_vae_config, load_vae

from .adversarial import PatchDiscriminator, adaptive_weight, discriminator_loss, generator_loss
from .common import (StageConfig, autocast, optimizer_step, StepBatches, is_done, mark_done, replace_config, run_stage, save_config,
                     set_lr, lr_at, step_generator, train_loop)
from .data import load_shot_frames
from .detail import detail_pixel_weights


@dataclass
class VAEStageConfig(StageConfig):
    out_dir: str = "runs/tiny/vae"
    data_dir: str = "runs/tiny/data"
    num_stories: int = 200  # stories whose shots are loaded into memory for training
    clip_frames: int = 9  # 4k+1: first frame alone, then chunks of 4
    crop: int = 32  # random square crop (multiple of 8); 0 = whole frames
    lr: float = 1e-3
    warmup_steps: int = 20
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-6
    # Loss weight of each clip's first frame against 1 for the others. The first frame goes through the
    # single-frame path (zero causal past), which is also how every global-context frame is encoded; it is
    # one frame of a clip, so at weight 1 it stays far blurrier than the chunked frames.
    first_frame_weight: float = 1.0
    # Extra loss weight on detail: pixels that differ from their neighbourhood (edges, small objects). A
    # Story World character covers ~5% of a frame, so plain L1/L2 is almost all background and lets the
    # VAE blur and recolour it. Weight per pixel: 1 + detail_weight * (its detail / the frame's mean detail).
    detail_weight: float = 0.0
    detail_radius: int = 3  # neighbourhood half-size (pixels) that detail is measured against
    # Weight of the latent shift loss: the same four frames should encode to the same latent wherever they
    # fall in a clip. The encoder's causal caches start from zeros, so without it the latents of a shot's
    # first chunks are a start-up transient (static content: adjacent latent frames correlate ~0.2 over the
    # first three, ~1.0 after), which the DiT then has to learn as separate codes. Needs clip_frames >= 9
    # and the encoder training (train_part all).
    latent_shift_weight: float = 0.0
    # Weight of the still-frame loss: a frame alone (the single-frame path every shot starts with) and a
    # still chunk of that frame should encode alike. Without it a shot's first latent frame is a code of
    # its own (static content: correlation ~0.2 with the next latent frame), and a DiT that gets the two
    # codes slightly out of step draws frame 0 unlike frame 1. Needs the encoder training.
    still_frame_weight: float = 0.0
    # Adversarial loss on the decoded frames (training.adversarial; 0 = off), as Wan's VAE is trained: its
    # weight against reconstruction, adaptive (1 pulls the decoder's last layer as hard as L1 + L2 do). The
    # discriminator learns from step 0; the VAE feels it from adv_start_step on, once the discriminator
    # tells frames apart.
    adv_weight: float = 0.0
    adv_start_step: int = 0
    disc_lr: float = 1e-4
    disc_width: int = 32
    sample_latent: bool = True  # reparameterised sample (VAE); false: z = mu (plain autoencoder)
    init_from: str = ""  # start from these VAE weights (a refine phase); statistics are re-fitted (train_part all)
    # Changes to the preset's VAE shape, e.g. {z_dim: 64}. From init_from weights with fewer latent
    # channels the VAE is widened without changing what it computes (widen_latent), then trained on.
    vae: dict = dataclasses.field(default_factory=dict)
    # "all" trains encoder and decoder; "decoder" freezes the encoder (init_from required) and keeps its
    # latent statistics, so latents already pre-encoded, and every DiT trained on them, stay valid.
    train_part: str = "all"
    stats_shots: int = 16  # shots encoded to measure the latent mean/std
    # A phase whose reconstructions barely depend on its input (collapsed, or still on the mean-image
    # plateau; see input_dependence and COLLAPSED_BELOW) is set aside as
    # OUT/<name>.collapsed_seed<N> and trained again from the same start with the next seed, this many times.
    collapse_retries: int = 2
    # Only a phase of at least this many steps is checked: every autoencoder first learns the mean image,
    # so a short run (the micro preset's few steps) can look collapsed without being stuck there.
    collapse_check_steps: int = 200
    export: str = ""  # optional copy of vae.safetensors (e.g. shotstream_core/weights/tiny/vae.safetensors)
    # Curriculum: [{name: ..., <any field above>: ...}, ...] run in order (see the module docstring);
    # empty = one phase with the fields above.
    phases: tuple[dict, ...] = ()

    def lengthens_exactly(self) -> bool:
        return not self.phases and super().lengthens_exactly()  # each phase has its own max_steps


class VAEAutoencoder(nn.Module):
    """Training view of WanVAE: causal chunked encode, reparameterised sample, causal chunked decode.

    Wrapping it (not the VAE) in DDP makes the whole computation go through DDP's forward.
    """

    def __init__(self, vae: WanVAE, sample_latent: bool = True, frozen_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.sample_latent = sample_latent
        self.frozen_encoder = frozen_encoder
        if frozen_encoder:  # before any DDP wrap, which registers only the parameters that train
            vae.encoder.requires_grad_(False)
            vae.conv1.requires_grad_(False)

    def _encode(self, clip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """clip [B, 3, 4k+1, H, W] -> raw (mu, log_var) [B, z, k+1, H/s, W/s]: the first frame alone, then
        chunks of 4, through one causal cache."""
        vae, stride = self.vae, VAE_TEMPORAL_STRIDE
        cache: dict = {}
        chunks = [clip[:, :, :1]] + [clip[:, :, i:i + stride] for i in range(1, clip.shape[2], stride)]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            h = torch.cat([vae.encoder(c, cache) for c in chunks], dim=2)
            return vae.conv1(h).chunk(2, dim=1)

    def forward(self, clip: torch.Tensor, eps: torch.Tensor, shifted: bool = False, still: bool = False):
        """clip [B, 3, T, H, W] in [-1, 1]; eps [B, z, (T-1)/4+1, H/s, W/s] -> (recon, mu, log_var, extra).

        extra holds the raw mu of two further encodings, each only when asked (they run inside forward so
        that DDP sees every parameter's use):
          "shifted" (shifted=True): the clip from its frame 4 on, [B, z, (T-1)/4, H/s, W/s], for latent_shift_loss;
          "still" (still=True): the clip's first frame held for 5 frames, [B, z, 2, H/s, W/s], for still_frame_loss.
        """
        vae, stride = self.vae, VAE_TEMPORAL_STRIDE
        mu, log_var = self._encode(clip)
        extra = {}
        if shifted:
            extra["shifted"] = self._encode(clip[:, :, stride:])[0]
        if still:
            extra["still"] = self._encode(clip[:, :, :1].expand(-1, -1, 1 + stride, -1, -1))[0]
        log_var = log_var.clamp(-30.0, 20.0)
        z = mu + torch.exp(0.5 * log_var) * eps if self.sample_latent else mu
        x = vae.conv2(z)
        cache = {}
        recon = torch.cat([vae.decoder(x[:, :, i:i + 1], cache) for i in range(x.shape[2])], dim=2)
        return recon, mu, log_var, extra


def relative_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared difference of two latents relative to their variance: scale-free, so shrinking the latents
    cannot lower it."""
    return ((a - b) ** 2).mean() / (0.5 * (a.var() + b.var())).clamp_min(1e-12)


def latent_shift_loss(mu: torch.Tensor, mu_shifted: torch.Tensor) -> torch.Tensor:
    """How much a chunk's latent depends on where it falls in the clip (0: not at all).

    mu [B, z, k+1, h, w] encodes a clip; mu_shifted [B, z, k, h, w] the same clip from its frame 4 on. For
    j >= 1, mu[:, :, j+1] and mu_shifted[:, :, j] both encode frames 4j+1..4j+4, one after a longer past
    than the other; the loss is their relative_mse.
    """
    a, b = mu[:, :, 2:], mu_shifted[:, :, 1:]
    if a.shape[2] == 0 or a.shape != b.shape:
        raise ValueError(f"latent_shift_loss needs a clip of at least 9 frames and its shift by 4 "
                         f"(latent frames k+1 and k); got {tuple(mu.shape)} and {tuple(mu_shifted.shape)}")
    return relative_mse(a, b)


def still_frame_loss(mu_still: torch.Tensor) -> torch.Tensor:
    """How differently a frame encodes alone and as a still chunk (0: alike).

    mu_still [B, z, 2, h, w] encodes a frame held for 5 frames: latent 0 is the frame through the
    single-frame path, latent 1 the same frame as a chunk of 4; the loss is their relative_mse."""
    if mu_still.shape[2] != 2:
        raise ValueError(f"still_frame_loss needs the latents of a 5-frame still clip (2 latent frames); "
                         f"got {tuple(mu_still.shape)}")
    return relative_mse(mu_still[:, :, 0], mu_still[:, :, 1])


@torch.no_grad()
def latent_stationarity(vae: WanVAE, shots: torch.Tensor, batch: int = 4) -> list[float]:
    """Correlation of adjacent latent frames of whole shots [S, F, H, W, 3] uint8, mean over shots: entry j
    compares latent frames j and j+1. On near-static shots a start-up transient shows as low early entries."""
    corr = []
    for i in range(0, len(shots), batch):
        video = shots[i:i + batch].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        z = vae.encode(video.to(vae.device, vae.dtype)).float()  # [B, z, f, h, w]
        a, b = z[:, :, :-1], z[:, :, 1:]
        a, b = a - a.mean(dim=(1, 3, 4), keepdim=True), b - b.mean(dim=(1, 3, 4), keepdim=True)
        num = (a * b).sum(dim=(1, 3, 4))
        den = (a.pow(2).sum(dim=(1, 3, 4)) * b.pow(2).sum(dim=(1, 3, 4))).sqrt().clamp_min(1e-12)
        corr.append(num / den)  # [B, f-1]
    return torch.cat(corr).mean(0).tolist()


def frame_weighted_mean(err: torch.Tensor, first_frame_weight: float,
                        pixel_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of err [B, C, T, H, W], each frame a pixel_weights-weighted mean ([B, 1, T, H, W], default
    uniform), the first frame weighted first_frame_weight : 1 against the others."""
    pw = (torch.ones_like(err[:, :1]) if pixel_weights is None else pixel_weights).expand_as(err)
    per_frame = (err * pw).sum(dim=(0, 1, 3, 4)) / pw.sum(dim=(0, 1, 3, 4))  # [T]
    w = torch.ones_like(per_frame)
    w[0] = first_frame_weight
    return (per_frame * w).sum() / w.sum()


def sample_clips(shots: torch.Tensor, idx: list[int], clip_frames: int, crop: int, g: torch.Generator):
    """shots uint8 [S, F, H, W, 3] -> float clips [B, 3, clip_frames, crop, crop] in [-1, 1]."""
    _, f, h, w, _ = shots.shape
    crop_h, crop_w = (crop, crop) if crop else (h, w)
    out = []
    for i in idx:
        t0 = int(torch.randint(0, f - clip_frames + 1, (1,), generator=g))
        y0 = int(torch.randint(0, h - crop_h + 1, (1,), generator=g))
        x0 = int(torch.randint(0, w - crop_w + 1, (1,), generator=g))
        out.append(shots[i, t0:t0 + clip_frames, y0:y0 + crop_h, x0:x0 + crop_w])
    clips = torch.stack(out).permute(0, 4, 1, 2, 3).float()  # [B, 3, T, h, w]
    return clips / 127.5 - 1.0


def stat_names(vae: WanVAE) -> tuple[str, ...]:
    """The latent-statistics buffers the VAE has (means first, then spreads)."""
    return ("latent_mean", "latent_std") + (("first_latent_mean", "first_latent_std")
                                             if vae.config.first_frame_stats else ())


def neutralise_stats(vae: WanVAE) -> dict[str, torch.Tensor]:
    """Set every statistic to 0 / 1 (so encode returns raw mu, the space training works in); returns the
    values it replaced."""
    saved = {}
    for name in stat_names(vae):
        buf = getattr(vae, name)
        saved[name] = buf.clone()
        buf.fill_(1.0 if name.endswith("std") else 0.0)
    return saved


@torch.no_grad()
def latent_statistics(vae: WanVAE, shots: torch.Tensor, batch: int = 4) -> dict[str, torch.Tensor]:
    """Per-channel mean / std of the raw encoder mean mu over whole shots [S, F, H, W, 3] uint8, by buffer
    name: over every latent frame, or, for a VAE with first_frame_stats, the first frame's apart from the
    rest's."""
    saved = neutralise_stats(vae)
    mus = []
    for i in range(0, len(shots), batch):
        video = shots[i:i + batch].permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
        mus.append(vae.encode(video).transpose(0, 1))  # [z, B, f, h, w]
    for name, value in saved.items():
        getattr(vae, name).copy_(value)
    mu = torch.cat(mus, dim=1)
    groups = {"": mu[:, :, 1:], "first_": mu[:, :, :1]} if vae.config.first_frame_stats else {"": mu}
    stats = {}
    for prefix, x in groups.items():
        x = x.flatten(1)  # [z, N]
        stats[prefix + "latent_mean"], stats[prefix + "latent_std"] = x.mean(1), x.std(1).clamp_min(1e-4)
    return stats


def save_vae(vae: WanVAE, path) -> Path:
    return save_tensors({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, path)


@torch.no_grad()
def reconstruction_sheet(vae: WanVAE, shots: torch.Tensor, path, frames=(0, 8, 16, 24, 32)) -> float:
    """Top rows originals, bottom rows reconstructions (encode -> decode of whole shots); returns PSNR."""
    from PIL import Image

    video = shots.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    recon = vae.decode(vae.encode(video))
    mse = float(((recon - video) ** 2).mean())
    psnr = 10 * np.log10(4.0 / max(mse, 1e-10))
    frames = [f for f in frames if f < video.shape[2]]
    rows = []
    for v, r in zip(video, recon):
        for src in (v, r):
            rows.append(torch.cat([src[:, f] for f in frames], dim=2))  # [3, H, W*len]
    sheet = ((torch.cat(rows, dim=1).clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(sheet).resize((sheet.shape[1] * 2, sheet.shape[0] * 2), Image.NEAREST).save(path)
    return psnr


# Below this, a phase has collapsed or never left the mean-image plateau. Measured on phase-a runs (5-frame
# 16x16 crops): collapsed runs 2e-5 and 8e-4, a random initialisation 0.05, a run still on the plateau
# after all its steps 0.07 (loss 0.85; its VAE ended 1.6 dB under a healthy run's), healthy ones 0.76-0.87.
COLLAPSED_BELOW = 0.3


@torch.no_grad()
def input_dependence(clips: torch.Tensor, recon: torch.Tensor) -> float:
    """How much the reconstructions of different clips differ, relative to how much the clips differ
    (spread over the batch, mean over pixels): ~1 for a working autoencoder, ~0 for a collapsed one.

    The collapse it detects (2 of 8 test runs of phase a): the decoder's residual stream grows a constant
    component (|x| ~400 against a spread of ~5 over inputs), and the head's RMS norm, which divides by
    |x| and subtracts no mean, returns the same image for every input. Its gradients then vanish and
    the loss stays on the predict-the-mean plateau for good."""
    if clips.shape[0] < 2:
        raise ValueError(f"input_dependence needs at least 2 clips to compare, got {clips.shape[0]}")
    return float(recon.std(dim=0).mean() / clips.std(dim=0).mean().clamp_min(1e-8))


def stage_vae_config(base: VAEConfig | str, changes: dict) -> VAEConfig:
    """The preset's VAE shape with the config's `vae:` changes; latent statistics are left to training."""
    base = get_vae_config(base) if isinstance(base, str) else base
    if not changes:
        return base
    changed = replace_config(base, changes, fixed=("latent_mean", "latent_std"),
                             what="vae (changes to the preset's VAE)")
    return changed.replace(latent_mean=None, latent_std=None)


@torch.no_grad()
def widen_latent(narrow: WanVAE, wide: WanVAE) -> None:
    """Copy `narrow` into `wide`, which has more latent channels, so that `wide` computes the same
    reconstruction: its first z_dim latent channels are narrow's, the new ones start as the encoder
    head's fresh random rows (passed through unchanged by conv1/conv2) and are read by the decoder through
    zero weights. Training then finds a use for them from the narrow VAE's quality, not from scratch."""
    z0, z = narrow.config.z_dim, wide.config.z_dim
    if z0 > z or narrow.config.replace(z_dim=z, latent_mean=None, latent_std=None) != \
            wide.config.replace(latent_mean=None, latent_std=None):
        raise ValueError(f"widen_latent needs the same VAE with at least as many latent channels: "
                         f"{narrow.config} -> {wide.config}")
    # moments rows (mu then log_var): the old channels are 0..z0-1 of each half, the new ones z0..z-1
    moments = torch.cat([torch.arange(z0), z + torch.arange(z0)])
    fresh = torch.cat([torch.arange(z0, z), z + torch.arange(z0, z)])
    src = narrow.state_dict()
    head = "encoder.head.2."
    for name, param in wide.state_dict().items():
        old = src[name]
        if name.startswith(head):  # [2z, C, ...]: copy the old rows, keep the fresh ones random
            param[moments] = old
        elif name in ("conv1.weight", "conv2.weight", "conv1.bias", "conv2.bias"):
            # 1x1 channel mixes: the old block, and identity on the new channels
            kept, extra = (moments, fresh) if name.startswith("conv1") else (torch.arange(z0), torch.arange(z0, z))
            param.zero_()
            if name.endswith("bias"):
                param[kept] = old
            else:
                param[kept[:, None], kept[None, :]] = old
                param[extra, extra] = 1.0
        elif name == "decoder.conv1.weight":  # [C, z, ...]: the decoder ignores the new channels at first
            param.zero_()
            param[:, :z0] = old
        elif name in stat_names(wide):
            param.copy_(torch.cat([old, param[z0:]]))
        else:
            param.copy_(old)


def phase_configs(cfg: VAEStageConfig) -> list[VAEStageConfig]:
    """The phases of cfg as complete configs: OUT/<name>/, each initialised from the one before."""
    out, prev, names = [], cfg.init_from, set()
    for i, phase in enumerate(cfg.phases):
        phase = dict(phase)
        name = str(phase.pop("name", "")).strip()
        if not name or "/" in name or name in names:
            raise ValueError(f"VAE phase {i + 1} needs a unique name without '/', got {name!r}")
        names.add(name)
        phase.setdefault("init_from", prev)
        base = dataclasses.replace(cfg, phases=(), export="", out_dir=str(Path(cfg.out_dir) / name))
        out.append(replace_config(base, phase, fixed=("phases", "out_dir", "export"), what=f"VAE phase {name!r}"))
        prev = str(Path(out[-1].out_dir) / "vae.safetensors")
    return out


def collapsed_attempts(phase_dir) -> list[Path]:
    """The attempts of a phase set aside after a collapse: <phase>.collapsed_seed<N> beside its folder."""
    phase_dir = Path(phase_dir)
    return sorted(phase_dir.parent.glob(f"{phase_dir.name}.collapsed_seed*"))


def train_until_not_collapsed(cfg: VAEStageConfig, dist) -> None:
    """train(cfg); while the result has collapsed, set it aside and train again with the next seed. The
    folders set aside count the attempts, so a run cut mid-retry resumes the right one."""
    out = Path(cfg.out_dir)
    base_seed = cfg.seed
    while True:
        cfg = dataclasses.replace(cfg, seed=base_seed + len(collapsed_attempts(out)))
        train(cfg, dist)
        done = json.loads((out / "done.json").read_text())
        dependence = done.get("input_dependence", 1.0)
        if dependence >= COLLAPSED_BELOW or int(done.get("steps", 0)) < cfg.collapse_check_steps:
            return
        if len(collapsed_attempts(out)) >= cfg.collapse_retries:
            raise RuntimeError(
                f"VAE phase {out.name!r} collapsed with seeds {base_seed}..{cfg.seed}: its reconstructions barely "
                f"depend on the input (input dependence {dependence:.2g}, under {COLLAPSED_BELOW}; healthy runs "
                f"~0.8), so it collapsed or never left the mean-image plateau. Its attempts are kept beside it "
                f"as {out.name}.collapsed_seed*. Fix: lower this phase's lr or raise its batch_size, or raise "
                f"collapse_retries (--set collapse_retries=N), and run the stage again.")
        dist.barrier()
        if dist.is_main:
            print(f"[vae] phase {out.name} collapsed or stayed on the plateau (input dependence "
                  f"{dependence:.2g}); training it again with seed {cfg.seed + 1}", flush=True)
            out.rename(out.parent / f"{out.name}.collapsed_seed{cfg.seed}")
        dist.barrier()


def train_phases(cfg: VAEStageConfig, dist) -> dict:
    """Run every phase not yet done (a cut phase resumes), then publish the last one as OUT/vae.safetensors."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    phases = phase_configs(cfg)
    summaries = []
    for sub in phases:
        if not is_done(sub.out_dir):
            train_until_not_collapsed(sub, dist)
        out_sub = Path(sub.out_dir)
        aside = [json.loads((d / "done.json").read_text()) for d in collapsed_attempts(out_sub)
                 if (d / "done.json").is_file()]
        summaries.append({"name": out_sub.name, **json.loads((out_sub / "done.json").read_text()),
                          "collapsed_attempts": len(aside),
                          "collapsed_wall_s": sum(float(d.get("wall_s", 0.0)) for d in aside)})
    summary = {"steps": sum(int(s.get("steps", 0)) for s in summaries), "stop_reason": "phases done",
               # the stage's time includes the attempts set aside
               "wall_s": sum(float(s.get("wall_s", 0.0)) + s["collapsed_wall_s"] for s in summaries),
               "psnr_db": summaries[-1].get("psnr_db"),
               "phases": [{k: v for k, v in s.items() if k != "final" and not k.endswith(("latent_mean", "latent_std"))}
                          for s in summaries]}
    if dist.is_main:
        last = Path(phases[-1].out_dir)
        for name in ("vae.safetensors", "recon.png"):
            if (last / name).is_file():
                copy_file(last / name, out / name)
        if cfg.export:
            copy_file(last / "vae.safetensors", cfg.export)
        mark_done(out, **summary)
    dist.barrier()
    return summary


def train(cfg: VAEStageConfig, dist) -> dict:
    """Train the VAE, then fit its latent statistics and export vae.safetensors."""
    if cfg.phases:
        return train_phases(cfg, dist)
    validate_frames(cfg.clip_frames)
    if cfg.train_part not in ("all", "decoder"):
        raise ValueError(f"train_part must be 'all' or 'decoder', got {cfg.train_part!r}")
    frozen_encoder = cfg.train_part == "decoder"
    if frozen_encoder and not cfg.init_from:
        raise ValueError("train_part=decoder needs init_from: the frozen encoder must come from a trained VAE")
    if cfg.adv_weight < 0 or (cfg.adv_weight > 0 and (cfg.disc_width <= 0 or cfg.disc_width % 8)):
        raise ValueError(f"adv_weight must be >= 0 (0 = off) and disc_width a positive multiple of 8 (the "
                         f"discriminator's group norms); got adv_weight {cfg.adv_weight}, disc_width {cfg.disc_width}")
    stride = stage_vae_config(get_preset(cfg.preset).vae, cfg.vae).spatial_stride
    if cfg.crop and cfg.crop % stride:
        raise ValueError(f"crop must be a multiple of {stride} (the VAE's spatial stride), got {cfg.crop}")
    if cfg.still_frame_weight and frozen_encoder:
        raise ValueError("still_frame_weight needs the encoder to train (train_part all, not 'decoder'): it "
                         "ties the encoder's single-frame code to its code for a still chunk of the same frame")
    if cfg.latent_shift_weight and (frozen_encoder or cfg.clip_frames < 9):
        raise ValueError(f"latent_shift_weight needs the encoder to train (train_part all, not "
                         f"{cfg.train_part!r}) and clips of at least 9 frames (clip_frames {cfg.clip_frames}): "
                         f"it compares each chunk's latent with the same frames' latent one chunk earlier")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        save_config(cfg, out / "config.yaml")
    preset = get_preset(cfg.preset)
    shots = load_shot_frames(cfg.data_dir, cfg.num_stories, preset.geometry)  # [S, F, H, W, 3] uint8
    if shots.shape[1] < cfg.clip_frames:
        raise ValueError(f"shots have {shots.shape[1]} frames, fewer than clip_frames={cfg.clip_frames}")

    torch.manual_seed(cfg.seed)
    vae = WanVAE(stage_vae_config(preset.vae, cfg.vae))
    if cfg.init_from:
        init = load_vae(cfg.init_from)
        if init.config.z_dim < vae.config.z_dim:
            if frozen_encoder:
                raise ValueError(f"init_from has {init.config.z_dim} latent channels and the config asks for "
                                 f"{vae.config.z_dim}: the new channels need the encoder to train (train_part all)")
            widen_latent(init, vae)
        else:
            try:
                vae.load_state_dict(init.state_dict())
            except RuntimeError as e:
                raise ValueError(f"init_from {cfg.init_from} is a VAE of {init.config}, not the {vae.config} this "
                                 f"config builds: set the config's vae: to match it") from e
        init_stats = neutralise_stats(vae)  # training works on raw mu; statistics are fitted again at the end
    vae = vae.to(dist.device)
    model = dist.wrap(VAEAutoencoder(vae, cfg.sample_latent, frozen_encoder))
    trained = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    modules, optimizers = {"vae": vae}, {"vae": opt}
    disc = None
    if cfg.adv_weight > 0:
        disc = PatchDiscriminator(cfg.disc_width).to(dist.device)
        disc_model = dist.wrap(disc)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, weight_decay=0.0, betas=(0.5, 0.9))
        modules["disc"], optimizers["disc"] = disc, disc_opt
        last_layer = vae.decoder.head[-1].weight  # where the adaptive weight compares the two terms
    batches = StepBatches(len(shots), cfg.batch_size, dist, cfg.seed)
    s_stride, t_stride = vae.config.spatial_stride, vae.config.temporal_stride

    def step_fn(step: int) -> dict:
        g = step_generator(cfg.seed, step, dist.rank)
        clips = sample_clips(shots, batches.indices(step), cfg.clip_frames, cfg.crop, g).to(dist.device)
        eps = torch.randn(clips.shape[0], vae.config.z_dim, (cfg.clip_frames - 1) // t_stride + 1,
                          clips.shape[-2] // s_stride, clips.shape[-1] // s_stride, generator=g).to(dist.device)
        set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_horizon))
        with autocast(cfg, dist.device):
            recon, mu, log_var, extra = model(clips, eps, shifted=cfg.latent_shift_weight > 0,
                                              still=cfg.still_frame_weight > 0)
        recon, mu, log_var = recon.float(), mu.float(), log_var.float()
        pixel_w = detail_pixel_weights(clips, cfg.detail_weight, cfg.detail_radius)
        l1 = frame_weighted_mean((recon - clips).abs(), cfg.first_frame_weight, pixel_w)
        l2 = frame_weighted_mean((recon - clips) ** 2, cfg.first_frame_weight, pixel_w)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).mean()
        reconstruction = cfg.l1_weight * l1 + cfg.l2_weight * l2
        loss = reconstruction + cfg.kl_weight * kl
        logs = {}
        if "shifted" in extra:
            shift = latent_shift_loss(mu, extra["shifted"].float())
            loss = loss + cfg.latent_shift_weight * shift
            logs["shift"] = float(shift.detach())
        if "still" in extra:
            still = still_frame_loss(extra["still"].float())
            loss = loss + cfg.still_frame_weight * still
            logs["still"] = float(still.detach())
        if disc is not None and step >= cfg.adv_start_step:
            adv = generator_loss(disc, recon)  # the bare module: only the discriminator's own step syncs it
            weight = cfg.adv_weight * adaptive_weight(reconstruction, adv, last_layer)
            loss = loss + weight * adv
            logs.update(adv=float(adv.detach()), adv_w=float(weight))
        gn = optimizer_step(loss, opt, trained, cfg.grad_clip)
        if disc is not None:
            d_loss = discriminator_loss(disc_model, clips, recon)  # detaches recon itself
            optimizer_step(d_loss, disc_opt, list(disc.parameters()), cfg.grad_clip)
            logs["disc"] = float(d_loss.detach())
        return {"loss": float(dist.all_mean(loss.detach())), "l1": float(l1.detach()), "l2": float(l2.detach()), "kl": float(kl.detach()),
                **logs, "grad_norm": float(gn), "lr": opt.param_groups[0]["lr"]}

    summary = train_loop(cfg, dist, modules, optimizers, step_fn, desc="vae")
    if dist.is_main:
        vae.eval()
        held = shots[-cfg.stats_shots:] if len(shots) > cfg.stats_shots else shots
        stats = init_stats if frozen_encoder else latent_statistics(vae, held.to(dist.device))
        for name, value in stats.items():
            getattr(vae, name).copy_(value)
        path = save_vae(vae, out / "vae.safetensors")
        reloaded = load_vae(path)  # what the engine will load
        psnr = reconstruction_sheet(reloaded, shots[:4], out / "recon.png")
        # probe clips shaped like this phase's training clips, the same for every attempt
        probe_shots = held if len(held) >= 2 else shots
        probe = sample_clips(probe_shots, list(range(len(probe_shots))), cfg.clip_frames, cfg.crop, torch.Generator().manual_seed(0))
        # through the training path (z = mu): the engine's encode also demands the DiT's 16-pixel multiple,
        # which crops of 24 (phase c) are not
        with torch.no_grad():
            recon = VAEAutoencoder(reloaded, sample_latent=False)(probe.to(dist.device), None)[0]
        dependence = input_dependence(probe.to(dist.device), recon)
        if cfg.export:
            save_vae(vae, cfg.export)
        summary.update(psnr_db=psnr, input_dependence=dependence, **{k: v.tolist() for k, v in stats.items()},
                       latent_adjacent_corr=latent_stationarity(reloaded, held[:8]))
        mark_done(out, **summary)
    dist.barrier()
    return summary


def main(argv=None):
    return run_stage(train, VAEStageConfig, argv)


if __name__ == "__main__":
    main()
