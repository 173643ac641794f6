"""A contact sheet of a story: one row per shot (evenly spaced frames) under its caption, as a PNG.

    python scripts/contact_sheet.py out/story/ShotStream/story5_state_00001.safetensors out/sheet.png
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)


def contact_sheet(shots: list[np.ndarray], captions: list[str], path: str | Path, per_shot: int = 8,
                  scale: int = 2, title: str = "") -> Path:
    """shots: uint8 [F, H, W, 3] per shot; writes a PNG grid (rows = shots) and returns its path."""
    if len(shots) != len(captions):
        raise ValueError(f"{len(shots)} shots but {len(captions)} captions")
    if not shots:
        raise ValueError("no shots to draw")
    h, w = shots[0].shape[1:3]
    cell_w, cell_h, pad = w * scale, h * scale, 6
    font = ImageFont.load_default()
    chars = max(20, per_shot * (cell_w + pad) // 7)  # the default font is about 6-7 px a character
    wrapped = [textwrap.wrap(f"shot {i + 1}: {c}", chars) or [""] for i, c in enumerate(captions)]
    line_h = 13
    title_h = line_h + pad if title else 0
    rows_h = [len(lines) * line_h + pad + cell_h + 2 * pad for lines in wrapped]
    sheet = Image.new("RGB", (pad + per_shot * (cell_w + pad), title_h + sum(rows_h) + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill=TEXT, font=font)
    y = title_h + pad
    for frames, lines, row_h in zip(shots, wrapped, rows_h):
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill=TEXT, font=font)
        top = y + len(lines) * line_h + pad
        picks = np.linspace(0, len(frames) - 1, min(per_shot, len(frames))).round().astype(int)
        for col, idx in enumerate(picks):
            tile = Image.fromarray(frames[idx]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (pad + col * (cell_w + pad), top))
        y += row_h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def sheet_from_state(state_path: str | Path, out: str | Path, **kwargs) -> Path:
    """Contact sheet of a saved StoryState (CacheState 'save' writes these)."""
    from shotstream_core.state import StoryState

    state = StoryState.load(state_path)
    shots = [s.frames.numpy() for s in state.shots]
    title = state.shots[0].global_caption if state.shots else ""
    return contact_sheet(shots, [s.caption for s in state.shots], out, title=title, **kwargs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", help="a saved story state (.safetensors with its .json beside it)")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--per-shot", type=int, default=8, help="frames shown per shot")
    parser.add_argument("--scale", type=int, default=2, help="pixel upscaling of each frame")
    args = parser.parse_args(argv)
    print(sheet_from_state(args.state, args.out, per_shot=args.per_shot, scale=args.scale))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
