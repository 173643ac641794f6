"""Where a VAE loses a character: small classifiers read its shape and colour from what each step keeps.

    python -m training.diagnose --vaes shotstream_core/weights/tiny/vae.safetensors --probe 600

Truth through the tiny VAE scores about 0.6 adherence, and its reconstructions draw small characters as
blobs. That loss happens either in the latent (the encoder keeps too little) or in the decoder (the
latent holds the shape but it is not drawn back). Reconstruction sheets cannot tell those apart; a probe
can. On single-character shots of held-out training-split stories it takes a few moments of each shot (the
pixel frames that close latent frames 2, 4, 6, ...) in four forms:
- truth: the rendered frame (the control: a probe that cannot read this is too weak to bound anything);
- pooled: the truth area-pooled to the latent grid (each cell's mean colour, nothing else);
- latent: the VAE's latent frame for it (encoded causally from the shot's start, as pre-encoding does);
- decoded: that latent decoded back to pixels (what a DiT drawing that latent perfectly would show).
For each form a small CNN is trained to name the character's shape (4 classes) and its colour (6); each
is scored on held-out stories, overall and per framing. Pixel forms go through a strided stem down to the
latent grid, so every probe has the same head at the same grid: where the latent row falls below the
truth row the encoder loses it; where the decoded row falls below the latent row the decoder does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from shotstream_core.config import Preset

from .storyworld.render import render_shot
from .storyworld.world import COLOURS, FRAMINGS, SHAPES, make_split

FORMS = ("truth", "pooled", "latent", "decoded")
TARGETS = ("shape", "colour")
PROBE_START = 200_000  # training-split stories from here on: no training set and no other diagnosis reaches


@dataclass
class ProbeSet:
    """The probed moments of single-character shots, in every form, with their labels."""

    forms: dict[str, torch.Tensor]  # form -> float [N, C, h, w] (pixels in [-1, 1], latents as encoded)
    shape: torch.Tensor  # long [N], index into SHAPES
    colour: torch.Tensor  # long [N], index into sorted(COLOURS)
    framing: torch.Tensor  # long [N], index into FRAMINGS
    story: torch.Tensor  # long [N], which story (train / test splits by story)


def probe_latent_frames(num_frames: int, temporal_stride: int = 4) -> list[int]:
    """The latent frames a shot is probed at: every other one from 2 on. Latent frame j > 0 encodes pixel
    frames 4j-3 .. 4j, so pixel frame 4j is the last it has seen; frames 0 and 1 are left out because the
    causal encoder is still starting up there (docs/EXPERIMENTS.md, the opening frame)."""
    num_latent = 1 + (num_frames - 1) // temporal_stride
    if num_latent < 3:
        raise ValueError(f"a {num_frames}-frame shot has {num_latent} latent frames; the probe needs at least 3")
    return list(range(2, num_latent, 2))


@torch.no_grad()
def build_probe_set(vae, preset: Preset, num_stories: int, start: int = PROBE_START,
                    batch: int = 8) -> ProbeSet:
    """Render, encode and decode the single-character shots of num_stories held-out stories; each shot
    gives one sample per probed latent frame (all of a shot's samples share its story, so they stay on one
    side of the train / test split)."""
    geo = preset.geometry
    stride, t_stride = vae.config.spatial_stride, 4
    js = probe_latent_frames(geo.frames_per_shot, t_stride)
    frames = [j * t_stride for j in js]
    colours = sorted(COLOURS)
    clips, labels = [], []
    for s, story in enumerate(make_split("train", num_stories, start=start)):
        for k, shot in enumerate(story.shots):
            if len(shot.cast) != 1:
                continue
            who = shot.cast[0]
            clips.append(render_shot(story, k, geo))  # uint8 [F, H, W, 3]
            labels.append((SHAPES.index(story.characters[who].shape),
                           colours.index(story.shot_character_colour(who)), FRAMINGS.index(shot.framing), s))
    if not clips:
        raise ValueError(f"{num_stories} stories gave no single-character shot: probe more stories")
    video = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # [S, 3, F, H, W]
    latents, decoded = [], []
    for i in range(0, len(video), batch):
        z = vae.encode(video[i:i + batch])  # [b, z, L, h, w]
        latents.append(z[:, :, js])
        decoded.append(vae.decode(z)[:, :, frames])  # [b, 3, m, H, W]

    def moments(x: torch.Tensor) -> torch.Tensor:  # [S, C, m, h, w] -> [S*m, C, h, w], shot-major
        return x.permute(0, 2, 1, 3, 4).flatten(0, 1)

    truth = moments(video[:, :, frames])
    lab = torch.tensor(labels).repeat_interleave(len(js), dim=0)
    forms = {"truth": truth, "pooled": F.avg_pool2d(truth, stride), "latent": moments(torch.cat(latents)),
             "decoded": moments(torch.cat(decoded)).clamp(-1, 1)}
    return ProbeSet(forms, lab[:, 0], lab[:, 1], lab[:, 2], lab[:, 3])


class ProbeNet(nn.Module):
    """The same network for every form: a stem of stem_layers 3x3 convolutions that halve the grid until
    it is the latent grid (pixel forms) and keep it from there (grid forms, so that every probe has the same
    depth), two more 3x3 convolutions, a global max pool (the character can be anywhere) and a linear
    layer to the classes."""

    def __init__(self, in_channels: int, downsample: int, num_classes: int, width: int = 48,
                 stem_layers: int = 3):
        super().__init__()
        halvings = downsample.bit_length() - 1
        if downsample < 1 or 2 ** halvings != downsample or halvings > stem_layers:
            raise ValueError(f"downsample must be a power of 2 up to 2**{stem_layers}, got {downsample}")
        layers, c = [], in_channels
        for i in range(stem_layers + 2):
            layers += [nn.Conv2d(c, width, 3, stride=2 if i < halvings else 1, padding=1), nn.GELU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, h*d, w*d] -> [N, classes]
        return self.out(self.body(x).amax(dim=(2, 3)))  # body: [N, width, h, w]


def train_probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, downsample: int, num_classes: int,
                steps: int = 600, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> ProbeNet:
    """Fit a ProbeNet on the rows of x where train is True (inputs standardised per channel on them)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ProbeNet(x.shape[1], downsample, num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    idx = train.nonzero().squeeze(1)
    for _ in range(steps):
        pick = idx[torch.randint(len(idx), (batch,), generator=g)]
        loss = F.cross_entropy(net(x[pick]), y[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def standardise(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Per-channel zero mean, unit spread, measured on the training rows only."""
    ref = x[train]
    mean = ref.mean(dim=(0, 2, 3), keepdim=True)
    std = ref.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


@torch.no_grad()
def accuracy(net: ProbeNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net(x).argmax(dim=1) == y).float().mean()) if len(y) else float("nan")


def run_probe(ps: ProbeSet, test_share: float = 0.25, steps: int = 800, forms=FORMS, targets=TARGETS,
              seeds=(0,)) -> dict:
    """{form: {target: {"all": acc, framing: acc, ..., "all_by_seed": [...]}}}: test accuracy on the
    held-out stories (the last test_share of them), the mean over one probe per seed (a probe's seed moves
    its shape accuracy by up to 0.1, so compare forms over a few); chance is 1/4 for shape, 1/6 for colour."""
    cut = int(ps.story.max().item() * (1 - test_share))
    train, test = ps.story <= cut, ps.story > cut
    if not train.any() or not test.any():
        raise ValueError("too few stories to split into probe training and test stories: probe more stories")
    latent_side = ps.forms["latent"].shape[-1]
    subsets = {"all": test, **{name: test & (ps.framing == f) for f, name in enumerate(FRAMINGS)}}
    out = {}
    for form in forms:
        x = standardise(ps.forms[form], train)
        downsample = x.shape[-1] // latent_side
        out[form] = {}
        for target in targets:
            y, n = {"shape": (ps.shape, len(SHAPES)), "colour": (ps.colour, len(COLOURS))}[target]
            runs = []
            for seed in seeds:
                net = train_probe(x, y, train, downsample, n, steps=steps, seed=seed)
                runs.append({name: accuracy(net, x[sel], y[sel]) for name, sel in subsets.items()})
            row = {name: round(float(np.mean([r[name] for r in runs])), 3) for name in subsets}
            row["all_by_seed"] = [round(r["all"], 3) for r in runs]
            out[form][target] = row
    out["counts"] = {"train_samples": int(train.sum()), "test_samples": int(test.sum())}
    return out
