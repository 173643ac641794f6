"""training.probe: small classifiers that read a character's shape and colour from the truth, the truth
pooled to the latent grid, a VAE's latent and its decoded frame. Each probe must be able to fail: a VAE
that keeps nothing scores near chance where the truth in the same run scores high."""
import json

import pytest
import torch
import torch.nn.functional as F

from shotstream_core.config import get_preset
from training.probe import ProbeNet, ProbeSet, build_probe_set, probe_latent_frames, run_probe
from training.storyworld.world import COLOURS, SHAPES

PRESET = get_preset("micro")
GEO = PRESET.geometry
STRIDE = 8


class _Config:
    spatial_stride = STRIDE


class _KeepAllVAE:
    """Latent frame j is pixel frame 4j, space-to-depth; decoding puts it back and holds it for the four
    frames it stands for, so the decoded frame 4j is the truth's frame 4j exactly."""
    config = _Config()

    def encode(self, video):  # [B, 3, F, H, W] -> [B, 3*s*s, L, H/s, W/s]
        frames = video[:, :, ::4]
        b, c, n, h, w = frames.shape
        z = F.pixel_unshuffle(frames.permute(0, 2, 1, 3, 4).flatten(0, 1), STRIDE)
        return z.unflatten(0, (b, n)).permute(0, 2, 1, 3, 4)

    def decode(self, z):
        b, c, n, h, w = z.shape
        x = F.pixel_shuffle(z.permute(0, 2, 1, 3, 4).flatten(0, 1), STRIDE).unflatten(0, (b, n))
        held = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(4, dim=1)], dim=1)  # [B, F, 3, H, W]
        return held.permute(0, 2, 1, 3, 4)


def test_probe_frames_skip_the_encoder_start_up():
    assert probe_latent_frames(33) == [2, 4, 6, 8]
    assert probe_latent_frames(GEO.frames_per_shot) == [2, 4]
    with pytest.raises(ValueError, match="at least 3"):
        probe_latent_frames(5)


def test_probe_net_brings_every_form_to_the_same_grid():
    pixels = ProbeNet(3, 8, len(SHAPES))
    grid = ProbeNet(16, 1, len(SHAPES))
    assert pixels(torch.randn(2, 3, 64, 64)).shape == (2, len(SHAPES)) == grid(torch.randn(2, 16, 8, 8)).shape
    # same depth for both: the stem's convolutions only differ in stride
    assert len(pixels.body) == len(grid.body)
    with pytest.raises(ValueError, match="power of 2"):
        ProbeNet(3, 6, 4)


def test_probe_set_holds_each_form_at_its_grid_with_labels():
    ps = build_probe_set(_KeepAllVAE(), PRESET, 6)
    n = len(ps.shape)
    moments = len(probe_latent_frames(GEO.frames_per_shot))
    assert n > 0 and n % moments == 0
    h, w = GEO.height // STRIDE, GEO.width // STRIDE
    assert ps.forms["truth"].shape == ps.forms["decoded"].shape == (n, 3, GEO.height, GEO.width)
    assert ps.forms["pooled"].shape == (n, 3, h, w) and ps.forms["latent"].shape == (n, 3 * STRIDE ** 2, h, w)
    assert torch.equal(ps.forms["decoded"], ps.forms["truth"])  # the keep-all VAE gives frame 4j back
    assert int(ps.shape.max()) < len(SHAPES) and int(ps.colour.max()) < len(COLOURS)
    assert torch.equal(ps.story[::moments].repeat_interleave(moments), ps.story)  # a shot's moments share it


def _coloured_patches(n: int, side: int = 32, patch: int = 6, seed: int = 0):
    """n frames [-1, 1] of muted noise with one saturated square of a random palette colour at a random
    place; returns (frames [n, 3, side, side], colour index [n])."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([COLOURS[c] for c in sorted(COLOURS)], dtype=torch.float32) / 127.5 - 1.0
    frames = 0.2 * torch.rand(n, 3, side, side, generator=g) - 0.1
    colour = torch.randint(len(palette), (n,), generator=g)
    for i in range(n):
        y, x = torch.randint(side - patch, (2,), generator=g).tolist()
        frames[i, :, y:y + patch, x:x + patch] = palette[colour[i]][:, None, None]
    return frames, colour


def test_probe_reads_what_a_form_keeps_and_not_what_it_drops():
    """Colour (6 classes, chance 1/6) is read from every form that keeps it (the frame, its pooled grid, a
    lossless space-to-depth "latent") and not from a form that dropped the square, in the same run."""
    frames, colour = _coloured_patches(480)
    dropped = frames.clone()
    dropped[:] = frames.median(dim=0).values  # every square gone: the same frame for all
    forms = {"truth": frames, "pooled": F.avg_pool2d(frames, STRIDE), "latent": F.pixel_unshuffle(frames, STRIDE),
             "decoded": dropped}
    zeros = torch.zeros_like(colour)
    ps = ProbeSet(forms, shape=zeros, colour=colour, framing=zeros, story=torch.arange(len(colour)) // 2)
    scores = run_probe(ps, steps=200, targets=("colour",))
    for form in ("truth", "pooled", "latent"):
        assert scores[form]["colour"]["all"] >= 0.9, (form, scores)
    assert scores["decoded"]["colour"]["all"] <= 0.35, scores
    assert scores["counts"]["test_samples"] == 120 and json.dumps(scores)


def test_probe_refuses_too_few_stories():
    with pytest.raises(ValueError, match="probe more stories"):
        run_probe(build_probe_set(_KeepAllVAE(), PRESET, 1), steps=1)
