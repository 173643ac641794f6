"""Contact sheets: a few frames of every shot, in rows, each with its caption above it."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .analyse import detect_cuts
from .storage import CSV_NAME, read_index, read_mp4, read_truth

TILE = 128  # frames are scaled (nearest) so that their height is at least this


def contact_sheet(frames: np.ndarray, ranges, shot_captions=None, global_caption: str | None = None,
                  per_shot: int = 4) -> Image.Image:
    """frames [N, H, W, 3] uint8, per-shot [start, end) ranges -> one RGB image."""
    N, H, W, _ = frames.shape
    scale = max(1, int(np.ceil(TILE / H)))
    th, tw = H * scale, W * scale
    font = ImageFont.load_default()
    chars = max(20, (per_shot * (tw + 4)) // 7)  # the default font is about 6-7 px a character
    line_h = 12
    blocks = []
    for k, (a, b) in enumerate(ranges):
        text = f"shot {k + 1} [{a}, {b})"
        if shot_captions is not None and k < len(shot_captions):
            text += ": " + shot_captions[k]
        blocks.append(textwrap.wrap(text, chars) or [""])
    head = textwrap.wrap(global_caption, chars) if global_caption else []
    width = per_shot * (tw + 4) + 4
    height = 4 + len(head) * line_h + sum(th + 8 + len(b) * line_h for b in blocks)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 4
    for line in head:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    for (a, b), lines in zip(ranges, blocks):  # each shot: its caption, then its frames
        y += 2
        for line in lines:
            draw.text((4, y), line, fill=(0, 0, 0), font=font)
            y += line_h
        picks = np.linspace(a, b - 1, per_shot).round().astype(int) if b > a else []
        for j, f in enumerate(picks):
            tile = Image.fromarray(frames[f]).resize((tw, th), Image.NEAREST)
            sheet.paste(tile, (4 + j * (tw + 4), y + 2))
        y += th + 6
    return sheet


def _stem(path: Path) -> Path:
    name = path.name
    for suffix in (".truth.json", ".json", ".mp4"):
        if name.endswith(suffix):
            return path.with_name(name[: -len(suffix)])
    return path


def sheet_for(path, story: str | None = None, per_shot: int = 4) -> Image.Image:
    """Contact sheet of a stored story (any of its files, or its name) or of any mp4.

    Ranges and captions come from `story` (a stored story's path) when given, else from the files beside
    the video (NAME.truth.json, NAME.json with index.csv); a bare video is split at its detected cuts.
    """
    path = Path(path)
    stem = _stem(path)
    video = path if path.suffix == ".mp4" else stem.with_suffix(".mp4")
    frames, _ = read_mp4(video)
    meta = _stem(Path(story)) if story else stem
    ranges, captions, global_caption = None, None, None
    truth = meta.with_name(meta.name + ".truth.json")
    if truth.is_file():
        st, _, ranges = read_truth(truth)
        captions, global_caption = list(st.shot_captions), st.global_caption
    elif (meta.parent / CSV_NAME).is_file():
        for rec in read_index(meta.parent / CSV_NAME):
            if rec.name == meta.name:
                ranges = rec.ranges
                d = json.loads(rec.json_path.read_text())
                global_caption = d.get("global_caption")
                captions = [d.get(f"shot{i + 1}", "") for i in range(len(ranges))]
    if ranges is None:
        cuts = detect_cuts(frames)
        bounds = [0] + cuts + [len(frames)]
        ranges = list(zip(bounds[:-1], bounds[1:]))
    ranges = [(a, min(b, len(frames))) for a, b in ranges if a < len(frames)]
    return contact_sheet(frames, ranges, captions, global_caption, per_shot)
