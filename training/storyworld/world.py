"""The Story World: places, characters, stories, captions and the seeded splits.

A story is pure data (no pixels): one place, one or two characters, and a list of shots. Each shot says
its framing (the characters' size), who is on screen and how they move, plus the few nuisance values the
renderer needs (camera horizon, start positions). `render.py` turns it into frames, `analyse.py` reads
frames back into the same vocabulary.

Memory cases: in a share of stories the global caption leaves out one attribute (a character's colour,
or the place). The story still has a value for it (drawn at random, so "picked in shot 1"), every shot
renders that same value, and no caption ever names it: a model can only match shot 1 by remembering it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

# --- the world's vocabulary ------------------------------------------------------------------------
# Backgrounds are muted, characters saturated, so that every pair of palette colours stays far apart in
# RGB (checked by tests/test_storyworld.py); the analyser classifies pixels by nearest palette colour.

# place -> (sky RGB at the top of the frame, ground RGB, base horizon as a fraction of the height)
PLACES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "meadow": ((110, 170, 235), (70, 150, 60)),
    "beach": ((60, 215, 215), (235, 220, 160)),
    "night": ((15, 20, 65), (60, 80, 60)),
    "desert": ((250, 180, 100), (180, 130, 75)),
    "snow": ((165, 180, 200), (245, 248, 252)),
    "cave": ((110, 75, 50), (130, 125, 120)),
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "orange": (255, 140, 0),
    "yellow": (245, 230, 30),
    "blue": (30, 70, 235),
    "purple": (140, 40, 200),
    "pink": (255, 110, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond")
FRAMINGS = ("wide", "medium", "close-up")
MOTIONS = ("left", "right", "up", "down", "still")

# Character height as a fraction of the frame height, per framing (a story jitters it by a few %).
FRAMING_SIZE = {"wide": 0.22, "medium": 0.34, "close-up": 0.52}
# Total displacement over a shot, as a fraction of the frame side, for a moving character.
MOTION_SPAN = 0.18
# Camera horizon range (fraction of the height) and the least change across a cut, which keeps every
# cut visible in the background even when the characters barely change.
HORIZON_RANGE = (0.42, 0.66)
MIN_HORIZON_STEP = 0.12

MEMORY_SHARE = 0.4  # share of stories whose global caption hides one attribute
TWO_CHARACTER_SHARE = 0.5
PALETTE_JITTER = 8  # per-story RGB offset, at most, of every palette colour
SIZE_JITTER = 0.07  # per-story relative change of the character sizes, at most

# Seeds. Training stories and evaluation stories come from different root seeds, so no training run
# can draw an evaluation story by accident (`make_split` and the CLI refuse the evaluation root).
TRAIN_SEED = 1
EVAL_SEED = 20_250_917


@dataclass(frozen=True)
class Character:
    shape: str
    colour: str
    tint: tuple[int, int, int] = (0, 0, 0)  # per-story RGB offset of its colour

    def describe(self, hide_colour: bool = False) -> str:
        return self.shape if hide_colour else f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Hidden:
    """The attribute a memory story leaves out of every caption."""

    kind: str  # "colour" | "place"
    value: str  # the value every render uses (the story's truth)
    character: int | None = None  # index into Story.characters when kind == "colour"


@dataclass(frozen=True)
class Shot:
    framing: str  # wide | medium | close-up
    cast: tuple[int, ...]  # characters on screen, by index into Story.characters, left to right
    motion: str  # left | right | up | down | still
    horizon: float  # camera horizon, fraction of the height
    starts: tuple[tuple[float, float], ...]  # start centre (x, y) per cast member, fractions of W, H


@dataclass(frozen=True)
class Story:
    place: str
    characters: tuple[Character, ...]
    shots: tuple[Shot, ...]
    hidden: Hidden | None = None
    size_scale: float = 1.0  # per-story jitter of FRAMING_SIZE
    bg_tint: tuple[int, int, int] = (0, 0, 0)  # per-story RGB offset of the place colours
    texture_seed: int = 0  # static background texture
    seed: int | None = None  # the seed it was made from, when known

    @property
    def num_shots(self) -> int:
        return len(self.shots)

    def hides_colour_of(self, index: int) -> bool:
        return self.hidden is not None and self.hidden.kind == "colour" and self.hidden.character == index

    @property
    def hides_place(self) -> bool:
        return self.hidden is not None and self.hidden.kind == "place"

    # --- captions (the reference's format: one global caption, one caption per shot) ---------------
    def _who(self, indices) -> str:
        names = [f"the {self.characters[i].describe(self.hides_colour_of(i))}" for i in sorted(indices)]
        return " and ".join(names)

    @property
    def global_caption(self) -> str:
        chars = " and ".join(
            f"a {c.describe(self.hides_colour_of(i))}" for i, c in enumerate(self.characters)
        )
        return f"{chars}." if self.hides_place else f"{chars} in the {self.place}."

    @property
    def shot_captions(self) -> tuple[str, ...]:
        out = []
        for shot in self.shots:
            framing = "close-up" if shot.framing == "close-up" else f"{shot.framing} shot"
            motion = "still" if shot.motion == "still" else f"moving {shot.motion}"
            out.append(f"{framing}, {self._who(shot.cast)}, {motion}.")
        return tuple(out)

    def captions_json(self) -> dict:
        """The reference's caption JSON: global_caption and shot1..shotN (1-based)."""
        d = {"global_caption": self.global_caption}
        d.update({f"shot{i + 1}": c for i, c in enumerate(self.shot_captions)})
        return d

    # --- structured truth --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["global_caption"] = self.global_caption
        d["shot_captions"] = list(self.shot_captions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Story":
        hidden = Hidden(**d["hidden"]) if d.get("hidden") else None
        chars = tuple(Character(c["shape"], c["colour"], tuple(c["tint"])) for c in d["characters"])
        shots = tuple(
            Shot(s["framing"], tuple(s["cast"]), s["motion"], float(s["horizon"]),
                 tuple(tuple(p) for p in s["starts"]))
            for s in d["shots"]
        )
        story = cls(d["place"], chars, shots, hidden, float(d["size_scale"]), tuple(d["bg_tint"]),
                    int(d["texture_seed"]), d.get("seed"))
        story.validate()
        return story

    def validate(self) -> None:
        if self.place not in PLACES:
            raise ValueError(f"unknown place {self.place!r}; choose one of {sorted(PLACES)}")
        for c in self.characters:
            if c.shape not in SHAPES or c.colour not in COLOURS:
                raise ValueError(f"unknown character {c}; shapes {SHAPES}, colours {sorted(COLOURS)}")
        if not 1 <= len(self.characters) <= 2:
            raise ValueError(f"a story has one or two characters, got {len(self.characters)}")
        for k, s in enumerate(self.shots):
            if s.framing not in FRAMINGS or s.motion not in MOTIONS:
                raise ValueError(f"shot {k + 1}: framing must be in {FRAMINGS}, motion in {MOTIONS}")
            if not s.cast or any(i >= len(self.characters) for i in s.cast) or len(s.starts) != len(s.cast):
                raise ValueError(f"shot {k + 1}: cast {s.cast} does not fit {len(self.characters)} characters")

    def shot_character_colour(self, index: int) -> str:
        return self.characters[index].colour


# --- sampling --------------------------------------------------------------------------------------

def _as_rng(seed_or_rng) -> tuple[np.random.Generator, int | None]:
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng, None
    if isinstance(seed_or_rng, (int, np.integer)) and seed_or_rng >= 0:
        return np.random.default_rng(int(seed_or_rng)), int(seed_or_rng)
    raise TypeError(f"make_story wants a non-negative int seed or a numpy Generator, got {seed_or_rng!r}")


def _starts(rng, sizes_wh, motion) -> tuple[tuple[float, float], ...]:
    """Start centres for a row of characters that stays fully inside the frame for the whole shot.

    sizes_wh: per cast member its side as a fraction of (W, H); the members stand in a row, left to right,
    with a small gap, and move together.
    """
    dx = {"left": -MOTION_SPAN, "right": MOTION_SPAN}.get(motion, 0.0)
    dy = {"up": -MOTION_SPAN, "down": MOTION_SPAN}.get(motion, 0.0)
    margin, gap = 0.02, 0.06
    widths = [w for w, _ in sizes_wh]
    row_w = sum(widths) + gap * (len(widths) - 1)
    # left edge of the row at the start, such that the row stays in [margin, 1 - margin] all shot long
    lo = margin + max(0.0, -dx)
    hi = 1 - margin - row_w - max(0.0, dx)
    x0 = rng.uniform(lo, max(lo, hi))
    starts, x = [], x0
    for w, h in sizes_wh:
        ylo = margin + h / 2 + max(0.0, -dy)
        yhi = 1 - margin - h / 2 - max(0.0, dy)
        starts.append((x + w / 2, float(rng.uniform(ylo, max(ylo, yhi)))))
        x += w + gap
    return tuple((float(a), float(b)) for a, b in starts)


def make_story(seed_or_rng, num_shots: int, *, memory_share: float = MEMORY_SHARE,
               aspect: float = 1.0) -> Story:
    """A random story with `num_shots` shots; the same seed always gives the same story.

    aspect = width / height of the frames it will be rendered at (start positions keep characters inside).
    """
    if num_shots < 1:
        raise ValueError(f"num_shots must be >= 1, got {num_shots}")
    rng, seed = _as_rng(seed_or_rng)
    place = str(rng.choice(list(PLACES)))
    n_chars = 2 if rng.random() < TWO_CHARACTER_SHARE else 1
    shapes = rng.choice(SHAPES, size=n_chars, replace=False)  # distinct shapes and colours, so that a
    colours = rng.choice(list(COLOURS), size=n_chars, replace=False)  # hidden colour stays unambiguous
    chars = tuple(
        Character(str(s), str(c), tuple(int(v) for v in rng.integers(-PALETTE_JITTER, PALETTE_JITTER + 1, 3)))
        for s, c in zip(shapes, colours)
    )
    hidden = None
    if rng.random() < memory_share:
        if rng.random() < 0.5:
            hidden = Hidden("place", place)
        else:
            i = int(rng.integers(n_chars))
            hidden = Hidden("colour", chars[i].colour, i)
    size_scale = float(1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))

    casts = [(0,)] if n_chars == 1 else [(0,), (1,), (0, 1)]
    shots: list[Shot] = []
    prev_key, prev_horizon = None, None
    for k in range(num_shots):
        while True:  # consecutive shots differ in framing or cast, so every cut shows
            framing = str(rng.choice(FRAMINGS))
            cast = casts[int(rng.integers(len(casts)))]
            if framing == "close-up" and len(cast) > 1:
                continue  # two close-ups side by side do not fit
            if hidden is not None and hidden.kind == "colour" and hidden.character not in cast:
                # shot 1 must show the hidden character, and so must at least one later shot
                if k == 0 or (k == num_shots - 1 and not any(hidden.character in s.cast for s in shots[1:])):
                    continue
            if (framing, cast) != prev_key or num_shots == 1:
                break
        while True:
            horizon = float(rng.uniform(*HORIZON_RANGE))
            if prev_horizon is None or abs(horizon - prev_horizon) >= MIN_HORIZON_STEP:
                break
        motion = str(rng.choice(MOTIONS))
        order = tuple(int(i) for i in rng.permutation(cast))  # left-to-right order on screen
        side = FRAMING_SIZE[framing] * size_scale
        starts = _starts(rng, [(side / aspect, side)] * len(order), motion)
        shots.append(Shot(framing, order, motion, horizon, starts))
        prev_key, prev_horizon = (framing, cast), horizon

    story = Story(place, chars, tuple(shots), hidden, size_scale,
                  tuple(int(v) for v in rng.integers(-PALETTE_JITTER, PALETTE_JITTER + 1, 3)),
                  int(rng.integers(2**31)), seed)
    story.validate()
    return story


SPLITS = {"train": (TRAIN_SEED, None), "eval5": (EVAL_SEED, 5), "eval10": (EVAL_SEED, 10)}
# Training-split stories from here on are never trained on (training sets stay below it): the development
# stories that experiments and recipe choices are measured on, so the evaluation split stays untouched.
DEV_START = 100_000


def training_stories(num_stories: int, min_shots: int = 2, max_shots: int = 4, start: int = 0,
                     aspect: float = 1.0) -> list[Story]:
    """Stories start.. of the train split with min_shots..max_shots shots (cycled): the training set."""
    if not 1 <= min_shots <= max_shots:
        raise ValueError(f"need 1 <= min_shots <= max_shots, got {min_shots}, {max_shots}")
    if start + num_stories > DEV_START:
        raise ValueError(f"training stories must stay below {DEV_START} (the development stories start there); "
                         f"got {start}..{start + num_stories - 1}")
    span = max_shots - min_shots + 1
    return [make_split("train", 1, num_shots=min_shots + i % span, start=i, aspect=aspect)[0]
            for i in range(start, start + num_stories)]


def story_seed(root: int, index: int, tag: int = 0) -> int:
    """Seed of story `index` under root seed `root`: independent streams via SeedSequence."""
    return int(np.random.SeedSequence([root, tag, index]).generate_state(1, dtype=np.uint32)[0])


def make_split(split: str, n: int, *, num_shots: int | None = None, start: int = 0,
               aspect: float = 1.0) -> list[Story]:
    """Stories [start, start + n) of a split.

    train: training stories (num_shots defaults to 5). eval5 / eval10: the held-out evaluation stories with
    5 / 10 shots, from a root seed training never uses (eval10 drives the drift metric).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {sorted(SPLITS)}")
    root, shots = SPLITS[split]
    if shots is not None and num_shots not in (None, shots):
        raise ValueError(f"split {split} has {shots}-shot stories; do not pass num_shots={num_shots}")
    shots = shots or num_shots or 5
    tag = shots if root == EVAL_SEED else 0  # eval5 and eval10 are different stories
    return [make_story(story_seed(root, i, tag), shots, aspect=aspect) for i in range(start, start + n)]
