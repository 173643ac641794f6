"""Vectorised numpy renderer: Story -> uint8 frames [N, H, W, 3] and per-shot [start, end) ranges.

Every shot is one static background (sky gradient over ground, cut at the shot's horizon, with a faint
per-story texture) and one or two anti-aliased shapes moving at constant speed. The background never
changes inside a shot (flicker is exactly zero in the truth); across a cut the horizon moves.
"""
from __future__ import annotations

import numpy as np

from shotstream_core.config import ShotGeometry, get_preset

from .world import COLOURS, FRAMING_SIZE, MOTION_SPAN, PLACES, Story

TEXTURE_AMPLITUDE = 5.0  # static RGB noise of the background, +-
SKY_GRADIENT = 14.0  # the sky brightens by this much towards the horizon
SHADE = 0.12  # characters darken by up to this share towards their bottom edge (a little texture)


def default_geometry() -> ShotGeometry:
    return get_preset("tiny").geometry


def _clip_rgb(c) -> np.ndarray:
    return np.clip(np.asarray(c, np.float32), 0, 255)


def shape_coverage(shape: str, x: np.ndarray, y: np.ndarray, half: float | np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape centred at the origin with half-side `half` (pixels).

    x, y: pixel-centre offsets from the centre, any broadcastable shapes. The coverage is
    clip(0.5 - signed_distance, 0, 1): a one-pixel ramp across the edge.
    """
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        sd = np.sqrt(x * x + y * y) - half
    elif shape == "square":
        sd = np.maximum(ax, ay) - half
    elif shape == "diamond":
        sd = (ax + ay - half) / np.sqrt(2.0)
    elif shape == "triangle":  # apex up, base at the bottom: the side lines are 2|x| = y + half
        sd = np.maximum(y - half, (2 * ax - y - half) / np.sqrt(5.0))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sd, 0.0, 1.0)


def background(story: Story, horizon: float, height: int, width: int) -> np.ndarray:
    """Static background [H, W, 3] float32 for one shot."""
    sky, ground = (_clip_rgb(np.add(c, story.bg_tint)) for c in PLACES[story.place])
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height  # [H]
    rel = np.clip(ys / horizon, 0, 1)[:, None]  # 0 at the top, 1 at the horizon
    sky_rows = sky[None] + SKY_GRADIENT * rel  # [H, 3]
    # soft horizon: one-pixel blend between sky and ground
    g = np.clip((ys * height - horizon * height) + 0.5, 0, 1)[:, None]
    rows = sky_rows * (1 - g) + ground[None] * g  # [H, 3]
    tex = np.random.default_rng(story.texture_seed).uniform(
        -TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, (height, width, 1)).astype(np.float32)
    return np.clip(rows[:, None, :] + tex, 0, 255)  # [H, W, 3]


def render_shot(story: Story, index: int, geometry: ShotGeometry | None = None) -> np.ndarray:
    """Frames [F, H, W, 3] uint8 of shot `index` (0-based)."""
    geometry = geometry or default_geometry()
    H, W, F = geometry.height, geometry.width, geometry.frames_per_shot
    shot = story.shots[index]
    frame = np.broadcast_to(background(story, shot.horizon, H, W), (F, H, W, 3)).copy()  # [F, H, W, 3]

    side = FRAMING_SIZE[shot.framing] * story.size_scale * H  # pixels, the same in x and y
    half = side / 2
    t = np.linspace(0.0, 1.0, F, dtype=np.float32)[:, None, None]  # [F, 1, 1]
    dx = {"left": -MOTION_SPAN, "right": MOTION_SPAN}.get(shot.motion, 0.0) * W
    dy = {"up": -MOTION_SPAN, "down": MOTION_SPAN}.get(shot.motion, 0.0) * H
    xs = np.arange(W, dtype=np.float32)[None, None, :] + 0.5  # [1, 1, W]
    ys = np.arange(H, dtype=np.float32)[None, :, None] + 0.5  # [1, H, 1]
    for ci, (sx, sy) in zip(shot.cast, shot.starts):
        char = story.characters[ci]
        cx = sx * W + dx * t  # [F, 1, 1]
        cy = sy * H + dy * t
        a = shape_coverage(char.shape, xs - cx, ys - cy, half)[..., None]  # [F, H, W, 1]
        colour = _clip_rgb(np.add(COLOURS[char.colour], char.tint))
        shade = 1 - SHADE * np.clip((ys - (cy - half)) / side, 0, 1)[..., None]  # [F, H, 1, 1]
        frame = frame * (1 - a) + (colour * shade) * a
    return np.round(frame).astype(np.uint8)


def render_story(story: Story, geometry: ShotGeometry | None = None, *, gap: int = 0,
                 gap_value: int = 128) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """All shots back to back: frames [N, H, W, 3] uint8 and the per-shot [start, end) frame ranges.

    gap > 0 puts that many flat grey frames between shots (to exercise readers on clips with gaps).
    """
    geometry = geometry or default_geometry()
    parts, ranges, pos = [], [], 0
    for k in range(story.num_shots):
        if k and gap:
            parts.append(np.full((gap, geometry.height, geometry.width, 3), gap_value, np.uint8))
            pos += gap
        clip = render_shot(story, k, geometry)
        parts.append(clip)
        ranges.append((pos, pos + len(clip)))
        pos += len(clip)
    return np.concatenate(parts), ranges
