"""Deterministic pixel analyser of Story World videos, and the metrics built on it.

The analyser never sees the story's hidden values or the renderer's nuisance values: it reads pixels.
1. Every pixel gets the label of its nearest palette colour (6 places x sky/ground, 6 character colours),
   or none when no palette colour is within MAX_COLOUR_DIST (blurry or noisy output).
2. Place of a shot: the place whose sky colour covers the top strip and whose ground colour covers the
   bottom strip best (averaged over the shot's frames); none when no place covers enough.
3. Characters: per character colour, the pixels with that label that have enough same-label neighbours
   (speckle dies), bounded by the run of mask rows/columns around the densest one (stray blobs elsewhere
   do not stretch the box). Shape = best IoU against the four shape templates fitted to the box; size =
   box height / frame height; motion = least-squares slope of the box centre over the shot.
4. Cuts: frames where the change from the previous frame (on 4x4-block means) towers over the change
   of the frames around it. A cut needs no story: it reads the whole video, and at most the length of the
   shortest shot, so that the frames around a cut reach no further than the two shots it separates.
Every shot needs at least MIN_SHOT_FRAMES (3) frames, so 5, 9, 13, ... on the VAE's 4k+1 grid: in a shorter
one a cut cannot be told from motion, and motion and flicker have no frames to compare, so `analyse_video`
raises ValueError rather than return scores that cannot fail (see `check_shot_lengths`).

Metrics (all "higher is better" except drift, which is a difference; see `aggregate`):
- adherence: share of the stated attributes of each shot that the video shows. Per shot the items are
  the place (when the global caption states it), each on-screen character (shape, and colour when
  stated), the exact cast (all of them and nobody else), the framing, and the motion.
- memory: on memory stories, share of later shots whose hidden attribute (place, or a character's colour)
  equals what the analyser saw in shot 1. Unreadable counts as a miss, so noise cannot score.
  `memory_by_kind` splits it by the hidden attribute, and `memory_stderr` is its standard error with the
  shots of one story counted together (they share one shot 1, so they are not independent draws).
- cut_f1: detected cuts against the true shot starts (a detection within one frame matches), counted
  over all stories; detections inside shots are false positives. `counts` gives the cuts missed and the
  spurious ones, and how many of those sit at a video's opening frames (frame 0 jumping against frame 1:
  the VAE decodes a shot's first latent frame alone, unlike the 4-frame chunks after it).
- drift: adherence over shots 6-10 minus adherence over shots 1-5, on stories with at least 10 shots
  (0 is perfect, negative means the story decays).
- flicker: 1 - (mean absolute frame-to-frame change of background pixels inside shots) / FLICKER_SCALE,
  clipped to [0, 1], so that higher is better like every other score. 1 = a perfectly steady background
  (the truth through H.264 changes by about 0.1 of 255 a frame: 0.996); FLICKER_SCALE = 32 (1/8 of the
  range) scores 0, and pure noise (a mean change of 255/3) is far below it.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from shotstream_core.config import VAE_TEMPORAL_STRIDE

from .render import shape_coverage
from .world import COLOURS, FRAMINGS, PLACES, SHAPES, Story

PLACE_NAMES = list(PLACES)
COLOUR_NAMES = list(COLOURS)
# palette rows: [sky of each place] + [ground of each place] + [each character colour]
PALETTE = np.array([PLACES[p][0] for p in PLACE_NAMES] + [PLACES[p][1] for p in PLACE_NAMES]
                   + [COLOURS[c] for c in COLOUR_NAMES], np.float32)  # [18, 3]
SKY0, GROUND0, CHAR0 = 0, len(PLACE_NAMES), 2 * len(PLACE_NAMES)
NO_LABEL = -1

MAX_COLOUR_DIST = 70.0  # RGB distance beyond which a pixel matches no palette colour
TOP_STRIP, BOTTOM_STRIP = 0.30, 0.20  # shares of the height read as sky / ground (horizons lie between)
MIN_PLACE_SCORE = 0.8  # of 2 (sky share + ground share)
MIN_NEIGHBOURS = 3  # same-label 8-neighbours a character pixel needs
MIN_SIDE = 0.06  # least box side (fraction of the height) of a character
MIN_FILL = 0.25  # least share of its box a character's mask fills
MIN_PRESENT = 0.5  # share of a shot's frames a character must be seen in
MIN_SHAPE_IOU = 0.5
SIZE_BOUNDS = (0.26, 0.41)  # box height / H between wide|medium and medium|close-up
STILL_BELOW = 0.08  # displacement over the shot (fraction of the side) below which nothing moves
CUT_MIN_CHANGE = 1.5  # least mean abs change (0-255) of a cut
CUT_RATIO = 4.0  # a cut's change must exceed this many times the median change around it
OPENING_FRAMES = 2  # a spurious cut at t <= this is the video's first frame(s) jumping against the next
CUT_WINDOW = 8  # frames either side of t whose changes are its baseline, at most: local to the shot at hand
CUT_SMEAR = 1  # changes this close to t stay out of its baseline: a soft or flashing cut spreads that far
# The window also stops short of the next cut (shortest shot - 1 frames), so a cut's baseline holds only the
# two shots it separates: with the fixed window, a moving 5-frame shot between still ones read as cuts.
# A shot needs a change of its own beyond the smear by each cut, and two frames to show motion or flicker.
# Validated on ground truth through H.264 at 64x64 and 32x32, 5 to 33 frames a shot: cut F1 1.0 from 9
# frames, 0.99 at 5 (motion per frame is 8x that at 33, and a few weak cuts stay under CUT_RATIO times it);
# 1-frame shots raise. tests/test_storyworld.py: test_short_shots_*.
MIN_SHOT_FRAMES = CUT_SMEAR + 2
FLICKER_SCALE = 32.0  # mean change (of 255) per frame that scores 0; noise (about 85) is far beyond
CHAR_DILATE = 2  # pixels around a character that flicker ignores (anti-aliased edges move)
SHAPE_EVERY = 4  # read the silhouette (shape, height) of every 4th frame a character is seen in, ...
MIN_SHAPE_READS = 5  # ... or of more in a short shot, so that its shape vote rests on at least this many
# RGB -> (Y, Cb, Cr) with chroma weighted down: silhouettes come from luma wherever it has contrast.
SHAPE_SPACE = np.array([[0.299, 0.587, 0.114],
                        [-0.169 * 0.3, -0.331 * 0.3, 0.5 * 0.3],
                        [0.5 * 0.3, -0.419 * 0.3, -0.081 * 0.3]], np.float32)


# --- per-pixel labels ------------------------------------------------------------------------------

def _label_table(bits: int = 6) -> np.ndarray:
    """Nearest palette label of every RGB cell of a 2^bits-per-channel grid (cell centres)."""
    n = 1 << bits
    c = (np.arange(n, dtype=np.float32) + 0.5) * (256 / n)
    grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)  # [n^3, 3]
    d2 = ((grid[:, None, :] - PALETTE[None]) ** 2).sum(-1)  # [n^3, 18]
    lab = d2.argmin(1)
    far = d2[np.arange(len(grid)), lab] > MAX_COLOUR_DIST ** 2
    return np.where(far, NO_LABEL, lab).astype(np.int8).reshape(n, n, n)


_LABELS = None
LABEL_BITS = 6  # the table's cells are 4 RGB levels wide: far below the palette's spacing


def label_pixels(frames: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 -> [...] int8 palette labels (NO_LABEL when nothing is close), by table look-up."""
    global _LABELS
    if _LABELS is None:
        _LABELS = _label_table(LABEL_BITS)
    q = np.asarray(frames, np.uint8) >> (8 - LABEL_BITS)
    return _LABELS[q[..., 0], q[..., 1], q[..., 2]]


def _neighbour_count(mask: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> number of True 8-neighbours of each pixel."""
    m = np.pad(mask.astype(np.int8), ((0, 0), (1, 1), (1, 1)))
    H, W = mask.shape[1:]
    total = sum(m[:, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    return total - mask


def _run_around_peak(profile: np.ndarray) -> tuple[int, int]:
    """[L] non-negative -> [a, b) the run of positive entries around the largest one."""
    p = int(profile.argmax())
    a, b = p, p + 1
    while a > 0 and profile[a - 1] > 0:
        a -= 1
    while b < len(profile) and profile[b] > 0:
        b += 1
    return a, b


# --- shapes ------------------------------------------------------------------------------------------

BLURS = (0.0, 0.04, 0.08, 0.12)  # blur (Gaussian sigma / shape size) the shape templates allow for
_BASE = 64  # templates are drawn at this size, blurred, cut to their silhouette's box, then resampled


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    r = int(np.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    img = np.apply_along_axis(np.convolve, 0, img, k, mode="same")
    return np.apply_along_axis(np.convolve, 1, img, k, mode="same")


def _base_templates() -> dict[str, list[np.ndarray]]:
    """Per shape, its silhouette (coverage >= 0.5 after blur) at each blur in BLURS, cut to its box.

    Blur rounds corners and eats tips before the silhouette's box is taken, just as codec chroma
    subsampling and a blurry generator do to a small shape; comparing against the blurred family keeps
    a soft diamond from looking more like a circle than like a diamond.
    """
    n = _BASE + 32
    c = np.arange(n, dtype=np.float64) + 0.5 - n / 2
    out = {}
    for shape in SHAPES:
        cov = shape_coverage(shape, c[None, :], c[:, None], _BASE / 2)
        out[shape] = []
        for r in BLURS:
            sil = _gaussian_blur(cov, r * _BASE) >= 0.5
            ys, xs = np.nonzero(sil)
            out[shape].append(sil[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return out


_TEMPLATES: dict[str, list[np.ndarray]] | None = None


def _templates(h: int, w: int) -> dict[str, list[np.ndarray]]:
    """Every shape's blurred silhouettes resampled (nearest) to an h x w box."""
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _base_templates()
    out = {}
    for shape, sils in _TEMPLATES.items():
        out[shape] = []
        for t in sils:
            rows = ((np.arange(h) + 0.5) / h * t.shape[0]).astype(int)
            cols = ((np.arange(w) + 0.5) / w * t.shape[1]).astype(int)
            out[shape].append(t[rows][:, cols])
    return out


def _alpha_crop(frame: np.ndarray, labels: np.ndarray, mask: np.ndarray, box) -> np.ndarray:
    """Binary silhouette of a character, read from all of RGB rather than from its colour labels.

    H.264 keeps colour at half resolution, so a small shape's colour-label mask is blocky; its luma keeps
    full resolution. Each pixel's share alpha of the character colour against the background colour of
    its row (alpha = (p - bg).(c - bg) / |c - bg|^2, in SHAPE_SPACE, which favours luma) carries both,
    and alpha >= 0.5 is the silhouette.
    """
    H, W, _ = frame.shape
    y0, y1, x0, x1 = box
    y0, y1, x0, x1 = max(0, y0 - 2), min(H, y1 + 2), max(0, x0 - 2), min(W, x1 + 2)
    px = frame[y0:y1].astype(np.float32)  # [h, W, 3]: whole rows, for their background
    is_bg = (labels[y0:y1] >= 0) & (labels[y0:y1] < CHAR0)  # [h, W]
    count = is_bg.sum(1)  # [h]
    bg = (px * is_bg[..., None]).sum(1) / np.maximum(count, 1)[:, None] if count.all() else None  # [h, 3]
    if bg is None:  # some row has no background pixel at all: use the frame's background
        fb = frame[(labels >= 0) & (labels < CHAR0)].astype(np.float32)
        bg = np.broadcast_to(np.median(fb, 0) if len(fb) else np.zeros(3, np.float32), (y1 - y0, 3))
    char = frame[mask].astype(np.float32).mean(0)  # [3]
    d = (char[None] - bg) @ SHAPE_SPACE.T  # [h, 3]
    p = (px[:, x0:x1] - bg[:, None]) @ SHAPE_SPACE.T  # [h, w, 3]
    alpha = (p * d[:, None]).sum(-1) / np.maximum((d * d).sum(-1), 1.0)[:, None]
    fg = alpha >= 0.5  # [h, w]
    if not fg.any():
        return mask[y0:y1, x0:x1]
    a, b = _run_around_peak(fg.sum(0))
    c, e = _run_around_peak(fg[:, a:b].sum(1))
    return fg[c:e, a:b]


def classify_shape(crop: np.ndarray) -> tuple[str | None, float]:
    """Best-fitting shape of a binary crop (its bounding box) and its IoU; None below MIN_SHAPE_IOU."""
    best, best_iou = None, 0.0
    for s, family in _templates(*crop.shape).items():
        iou = max((t & crop).sum() / max(1, (t | crop).sum()) for t in family)
        if iou > best_iou:
            best, best_iou = s, float(iou)
    return (best if best_iou >= MIN_SHAPE_IOU else None), best_iou


def size_class(height_frac: float) -> str:
    return FRAMINGS[int(np.searchsorted(SIZE_BOUNDS, height_frac))]


def motion_class(dx: float, dy: float) -> str:
    if max(abs(dx), abs(dy)) < STILL_BELOW:
        return "still"
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


# --- one shot ----------------------------------------------------------------------------------------

@dataclass
class Detection:
    colour: str
    shape: str | None
    size: str  # size class
    height: float  # median box height / H
    motion: str
    displacement: tuple[float, float]  # (dx / W, dy / H) over the shot
    seen: float  # share of the shot's frames it was seen in


@dataclass
class ShotAnalysis:
    place: str | None
    place_score: float
    characters: list[Detection]

    def find(self, shape: str, colour: str | None = None) -> Detection | None:
        for d in self.characters:
            if d.shape == shape and (colour is None or d.colour == colour):
                return d
        return None


def analyse_shot(frames: np.ndarray, labels: np.ndarray | None = None) -> tuple[ShotAnalysis, np.ndarray]:
    """frames [F, H, W, 3] uint8 of one shot -> (analysis, character mask [F, H, W] bool)."""
    F, H, W, _ = frames.shape
    labels = label_pixels(frames) if labels is None else labels

    top, bottom = labels[:, : max(1, int(TOP_STRIP * H))], labels[:, H - max(1, int(BOTTOM_STRIP * H)):]
    scores = np.array([(top == SKY0 + i).mean() + (bottom == GROUND0 + i).mean()
                       for i in range(len(PLACE_NAMES))])
    best = int(scores.argmax())
    place = PLACE_NAMES[best] if scores[best] >= MIN_PLACE_SCORE else None

    dets, any_char = [], np.zeros(labels.shape, bool)
    t = np.arange(F, dtype=np.float64)
    shape_every = max(1, min(SHAPE_EVERY, F // MIN_SHAPE_READS))
    for ci, colour in enumerate(COLOUR_NAMES):
        raw = labels == CHAR0 + ci
        if raw.sum() < F * (MIN_SIDE * H) ** 2 * MIN_PRESENT * MIN_FILL:
            continue  # cannot be present in enough frames: skip the per-frame work
        mask = raw & (_neighbour_count(raw) >= MIN_NEIGHBOURS)
        any_char |= mask
        seen_t, cx, cy, hs, shapes = [], [], [], [], []
        for f in range(F):
            m = mask[f]
            if m.sum() < (MIN_SIDE * H) ** 2 * MIN_FILL:
                continue
            x0, x1 = _run_around_peak(m.sum(0))
            y0, y1 = _run_around_peak(m[:, x0:x1].sum(1))
            crop = m[y0:y1, x0:x1]
            h, w = crop.shape
            if min(h, w) < MIN_SIDE * H or crop.mean() < MIN_FILL:
                continue
            ys, xs = np.nonzero(crop)
            seen_t.append(t[f]); cx.append(xs.mean() + x0); cy.append(ys.mean() + y0)
            if (len(seen_t) - 1) % shape_every == 0:  # silhouettes cost: read a sample
                silhouette = _alpha_crop(frames[f], labels[f], m, (y0, y1, x0, x1))
                hs.append(silhouette.shape[0] / H)
                shapes.append(classify_shape(silhouette)[0])
        if len(seen_t) < MIN_PRESENT * F:
            continue
        named = [s for s in shapes if s is not None]
        # The most frequent shape; a tie goes to the one read first. (max over a set broke ties by string
        # hash order, which Python salts per process: the same video scored differently run to run.)
        shape = Counter(named).most_common(1)[0][0] if named else None
        if len(seen_t) >= 2:
            span = (F - 1) if F > 1 else 1
            dx = float(np.polyfit(seen_t, cx, 1)[0] * span / W)
            dy = float(np.polyfit(seen_t, cy, 1)[0] * span / H)
        else:
            dx = dy = 0.0
        height = float(np.median(hs))
        dets.append(Detection(colour, shape, size_class(height), height, motion_class(dx, dy), (dx, dy),
                              len(seen_t) / F))
    return ShotAnalysis(place, float(scores[best]), dets), any_char


# --- cuts ---------------------------------------------------------------------------------------------

def frame_changes(frames: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] -> [N] mean abs change from the previous frame on 4x4-block means (0 for frame 0)."""
    N, H, W, _ = frames.shape
    b = 4 if H % 4 == 0 and W % 4 == 0 else 1
    small = frames.astype(np.float32).reshape(N, H // b, b, W // b, b, 3).mean((2, 4))
    return np.concatenate([[0.0], np.abs(np.diff(small, axis=0)).mean((1, 2, 3))])


def shortest_analysable_length() -> int:
    """The shortest legal shot (4k+1 frames, the VAE's rule) of at least MIN_SHOT_FRAMES frames."""
    return MIN_SHOT_FRAMES + (1 - MIN_SHOT_FRAMES) % VAE_TEMPORAL_STRIDE


def short_shot_advice() -> str:
    """What a too-short shot's error says: why, and which lengths to use instead."""
    first = shortest_analysable_length()
    legal = ", ".join(str(first + k * VAE_TEMPORAL_STRIDE) for k in range(3))
    return (f"the Story World analyser needs shots of at least {MIN_SHOT_FRAMES} frames, so {legal}, ... on the "
            f"VAE's 4k+1 grid (in a shorter shot a cut cannot be told from motion, and motion and flicker have no "
            f"frames to compare); render and generate such shots, e.g. `python -m training.storyworld make "
            f"--frames {first}`")


def check_shot_lengths(lengths, where: str = "") -> None:
    """Raise ValueError when a shot has fewer than MIN_SHOT_FRAMES frames; `where` prefixes the message.

    In 1-frame shots every frame change is a cut, so a cut cannot be told from motion (and noise would
    score a perfect cut F1); motion has no second frame to move to, and flicker nothing to compare.
    """
    short = [k for k, n in enumerate(lengths) if n < MIN_SHOT_FRAMES]
    if short:
        n = lengths[short[0]]
        raise ValueError(f"{where}{len(short)} of {len(lengths)} shots are too short (shot {short[0] + 1} has "
                         f"{n} frame{'s' * (n != 1)}): {short_shot_advice()}")


def detect_cuts(frames: np.ndarray, shortest_shot: int | None = None) -> list[int]:
    """Frame indices t where a new shot starts (the change lies between frame t-1 and t).

    A cut's change must tower over the median change of the frames up to CUT_WINDOW either side (leaving
    out the CUT_SMEAR next to it). shortest_shot: frames in the video's shortest shot, when known; the
    window then stops short of the next cut, so that a cut's baseline reads only the two shots it
    separates (with a longer window, a moving shot between still ones looked like a row of cuts). Unknown
    (a bare video), shots are taken to be at least CUT_WINDOW + 1 frames long.
    """
    window = CUT_WINDOW
    if shortest_shot is not None:
        if shortest_shot < MIN_SHOT_FRAMES:
            raise ValueError(f"detect_cuts: shortest_shot={shortest_shot}: {short_shot_advice()}")
        window = min(CUT_WINDOW, shortest_shot - 1)
    d = frame_changes(frames)
    cuts = []
    for t in range(1, len(d)):
        lo, hi = max(1, t - window), min(len(d), t + window + 1)
        around = np.concatenate([d[lo:max(lo, t - CUT_SMEAR)], d[min(hi, t + CUT_SMEAR + 1):hi]])
        base = float(np.median(around)) if len(around) else 0.0
        is_peak = d[t] >= d[max(1, t - CUT_SMEAR):t + CUT_SMEAR + 1].max()
        if d[t] >= CUT_MIN_CHANGE and d[t] >= CUT_RATIO * base and is_peak:
            cuts.append(t)
    return cuts


# --- a whole video ----------------------------------------------------------------------------------

@dataclass
class VideoAnalysis:
    shots: list[ShotAnalysis]
    cuts: list[int]
    flicker_change: float  # mean abs change of background pixels inside shots (0-255)

    def to_dict(self) -> dict:
        return asdict(self)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    for _ in range(r):
        m = mask.copy()
        m[:, 1:] |= mask[:, :-1]; m[:, :-1] |= mask[:, 1:]
        m[:, :, 1:] |= mask[:, :, :-1]; m[:, :, :-1] |= mask[:, :, 1:]
        mask = m
    return mask


def analyse_video(frames: np.ndarray, ranges) -> VideoAnalysis:
    """frames [N, H, W, 3] uint8 and per-shot [start, end) ranges -> per-shot analysis, cuts, flicker."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got {frames.shape}")
    if ranges and ranges[-1][1] > len(frames):
        raise ValueError(f"the video has {len(frames)} frames but its shots end at {ranges[-1][1]}; "
                         f"generate every shot in full")
    check_shot_lengths([b - a for a, b in ranges])
    labels = label_pixels(frames)
    shots, changes = [], []
    for a, b in ranges:
        shot, chars = analyse_shot(frames[a:b], labels[a:b])
        shots.append(shot)
        bg = ~_dilate(chars, CHAR_DILATE)
        bg = bg[1:] & bg[:-1]  # [F-1, H, W]: background in both frames of a pair
        diff = np.abs(np.diff(frames[a:b].astype(np.float32), axis=0)).mean(-1)
        changes.append(float(diff[bg].mean()) if bg.any() else FLICKER_SCALE)
    flicker = float(np.mean(changes)) if changes else 0.0
    shortest = min((b - a for a, b in ranges), default=None)
    return VideoAnalysis(shots, detect_cuts(frames, shortest), flicker)


# --- scoring against the story -------------------------------------------------------------------------

@dataclass
class StoryScore:
    adherence_items: list[list[float]]  # per shot, one 0/1 per stated attribute
    item_names: list[list[str]]
    memory_items: list[float]  # one 0/1 per later shot that shows the hidden attribute
    memory_kind: str | None  # Hidden.kind of a memory story ("place" or "colour"), else None
    cut_tp: int
    cut_fp: int
    cut_fn: int
    cut_fp_opening: int  # of cut_fp, those at the video's opening frames (t <= OPENING_FRAMES)
    flicker: float  # score in [0, 1]
    analysis: VideoAnalysis | None = field(default=None, repr=False)

    def adherence(self, shots: slice = slice(None)) -> float:
        items = [x for s in self.adherence_items[shots] for x in s]
        return float(np.mean(items)) if items else float("nan")


def identify_cast(shot: ShotAnalysis, story: Story, cast) -> tuple[list[Detection | None], list[Detection]]:
    """(the detection that stands for each story character of `cast` (indices) in one shot, None where none
    does; the candidates for the character whose colour is hidden).

    A character whose colour the caption states is the detection of that colour. The one whose colour is
    hidden is a detection of its shape (all the caption says about it) among those left once the stated
    ones are matched: the first such candidate stands for it, and memory, which compares its colour with
    shot 1's, needs it to be the only one. Its shape must be read: told by elimination alone, a model that
    draws one fixed blob in every shot would keep "its" colour perfectly (random weights scored 1.0 so)."""
    found = {}
    for i in cast:
        if not story.hides_colour_of(i):
            colour = story.characters[i].colour
            found[i] = next((d for d in shot.characters if d.colour == colour), None)
    left = [d for d in shot.characters if not any(d is m for m in found.values())]
    candidates = []
    for i in cast:
        if story.hides_colour_of(i):
            candidates = [d for d in left if d.shape == story.characters[i].shape]
            found[i] = candidates[0] if candidates else None
    return [found[i] for i in cast], candidates


def match_cuts(detected, true_starts, tolerance: int = 1) -> tuple[int, int, int]:
    """Greedy one-to-one matching within `tolerance` frames -> (tp, fp, fn)."""
    free = sorted(true_starts)
    tp = 0
    for c in sorted(detected):
        hit = next((b for b in free if abs(b - c) <= tolerance), None)
        if hit is not None:
            free.remove(hit)
            tp += 1
    return tp, len(detected) - tp, len(free)


def score_story(story: Story, frames: np.ndarray, ranges) -> StoryScore:
    analysis = analyse_video(frames, ranges)
    items, names = [], []
    for truth, seen in zip(story.shots, analysis.shots):
        it, nm = [], []
        if not story.hides_place:
            it.append(float(seen.place == story.place)); nm.append("place")
        matched, _ = identify_cast(seen, story, truth.cast)
        right = [m is not None and m.shape == story.characters[i].shape for i, m in zip(truth.cast, matched)]
        it += [float(r) for r in right]; nm += ["character"] * len(right)
        extra = [d for d in seen.characters if not any(d is m for m in matched)]
        it.append(float(all(right) and not extra)); nm.append("cast")
        found = [m for m in matched if m is not None]
        if found:
            height = float(np.median([m.height for m in found]))
            dx = float(np.mean([m.displacement[0] for m in found]))
            dy = float(np.mean([m.displacement[1] for m in found]))
            it += [float(size_class(height) == truth.framing), float(motion_class(dx, dy) == truth.motion)]
        else:
            it += [0.0, 0.0]
        nm += ["framing", "motion"]
        items.append(it); names.append(nm)

    memory = []
    if story.hidden is not None and story.num_shots > 1:
        first = analysis.shots[0]
        if story.hides_place:
            for seen in analysis.shots[1:]:
                memory.append(float(first.place is not None and seen.place == first.place))
        else:
            h = story.hidden.character

            def hidden_colour(seen: ShotAnalysis, truth) -> str | None:
                """Its colour where one detection can be it; None where none or several can."""
                if h not in truth.cast:  # (the world puts it in shot 1; a story file need not)
                    return None
                _, candidates = identify_cast(seen, story, truth.cast)
                return candidates[0].colour if len(candidates) == 1 else None

            ref = hidden_colour(first, story.shots[0])
            for truth, seen in zip(story.shots[1:], analysis.shots[1:]):
                if h in truth.cast:
                    memory.append(float(ref is not None and hidden_colour(seen, truth) == ref))

    starts = [a for a, _ in ranges[1:]]
    tp, fp, fn = match_cuts(analysis.cuts, starts)
    opening = sum(1 for c in analysis.cuts if c <= OPENING_FRAMES and all(abs(c - b) > 1 for b in starts))
    flicker = float(np.clip(1 - analysis.flicker_change / FLICKER_SCALE, 0, 1))
    memory_kind = story.hidden.kind if story.hidden is not None else None
    return StoryScore(items, names, memory, memory_kind, tp, fp, fn, opening, flicker, analysis)


def clustered_stderr(groups: list[list[float]]) -> float | None:
    """Standard error of the pooled mean of 0/1 items that come in correlated groups (the later shots of
    one story): the ratio estimator's cluster-robust error. None below two non-empty groups."""
    groups = [g for g in groups if g]
    if len(groups) < 2:
        return None
    total = sum(len(g) for g in groups)
    mean = sum(sum(g) for g in groups) / total
    resid = np.array([sum(g) - mean * len(g) for g in groups])
    k = len(groups)
    return float(np.sqrt(k / (k - 1) * np.sum(resid ** 2)) / total)


def aggregate(scores: list[StoryScore]) -> dict:
    """Metrics over many stories (see the module docstring); counts say how much each rests on."""
    if not scores:
        raise ValueError("no stories to aggregate")
    mem = [x for s in scores for x in s.memory_items]
    by_kind: dict[str, list[float]] = {}
    for s in scores:
        if s.memory_items:
            by_kind.setdefault(s.memory_kind, []).extend(s.memory_items)
    tp, fp, fn = (sum(getattr(s, k) for s in scores) for k in ("cut_tp", "cut_fp", "cut_fn"))
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    long = [s for s in scores if len(s.adherence_items) >= 10]
    per_item: dict[str, list[float]] = {}
    for s in scores:
        for it, nm in zip(s.adherence_items, s.item_names):
            for x, n in zip(it, nm):
                per_item.setdefault(n, []).append(x)
    return {
        "adherence": float(np.mean([s.adherence() for s in scores])),
        "memory": float(np.mean(mem)) if mem else None,
        "memory_stderr": clustered_stderr([s.memory_items for s in scores]),
        "memory_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
        "cut_f1": float(f1),
        "drift": float(np.mean([s.adherence(slice(5, 10)) - s.adherence(slice(0, 5)) for s in long]))
        if long else None,
        "flicker": float(np.mean([s.flicker for s in scores])),
        "adherence_by_item": {k: float(np.mean(v)) for k, v in sorted(per_item.items())},
        "counts": {"stories": len(scores), "memory_shots": len(mem),
                   "memory_stories": sum(bool(s.memory_items) for s in scores),
                   "memory_shots_by_kind": {k: len(v) for k, v in sorted(by_kind.items())},
                   "ten_shot_stories": len(long),
                   "cuts_true": tp + fn, "cuts_detected": tp + fp, "cuts_missed": fn, "cuts_spurious": fp,
                   "cuts_spurious_opening": sum(s.cut_fp_opening for s in scores)},
    }
