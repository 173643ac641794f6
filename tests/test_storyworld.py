"""Story World: reproducible stories, the reference's data format, and an analyser that can fail.

Quick tests run on a few dozen stories; `test_ground_truth_scores_many` (marked slow: the default test
command leaves it out, `pytest -m slow` runs it) repeats the ground-truth check on 250 stories.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shotstream_core.config import VAE_TEMPORAL_STRIDE, ShotGeometry, get_preset
from training.storyworld import (COLOURS, PLACES, aggregate, make_split, make_story, read_index,
                                 read_mp4, read_story_clip, render_shot, render_story, score_story,
                                 shot_flags, write_mp4, write_story, write_stories)
from training.storyworld.analyse import MAX_COLOUR_DIST
from training.storyworld.storage import validate_ranges

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = get_preset("tiny").geometry
slow = pytest.mark.slow  # excluded by the default test command; run with -m slow


def codec_roundtrip(frames, tmp_path, name="v") -> np.ndarray:
    path = tmp_path / f"{name}.mp4"
    write_mp4(path, frames, GEOMETRY.fps)
    return read_mp4(path)[0]


def score_all(stories, make_frames, geometry=GEOMETRY) -> dict:
    scores = []
    for i, s in enumerate(stories):
        frames, ranges = render_story(s, geometry)
        scores.append(score_story(s, make_frames(i, s, frames, ranges), ranges))
    return aggregate(scores)


# --- the world ---------------------------------------------------------------------------------------

def test_palette_is_separable():
    bg = [c for pair in PLACES.values() for c in pair]
    colours = np.array(bg + list(COLOURS.values()), float)
    d = np.linalg.norm(colours[:, None] - colours[None], axis=-1)[np.triu_indices(len(colours), 1)]
    # every palette colour is far from every other, compared with per-story tint + texture + gradient
    assert d.min() > 50, d.min()
    assert MAX_COLOUR_DIST < d.max()


def test_stories_are_reproducible_and_captions_regular():
    a, b = make_story(123, 6), make_story(123, 6)
    assert a == b and a.global_caption == b.global_caption
    assert make_story(124, 6) != a
    stories = make_split("train", 300)
    assert all(s == t for s, t in zip(stories[:5], make_split("train", 5)))
    words = set()
    for s in stories:
        assert len(s.shot_captions) == s.num_shots == 5
        caps = s.captions_json()
        assert list(caps) == ["global_caption"] + [f"shot{i + 1}" for i in range(5)]
        for text in caps.values():
            words.update(text.replace(",", " ").replace(".", " ").split())
        if s.hidden is not None:  # the hidden attribute is never named, in any caption
            all_text = " ".join(caps.values())
            if s.hidden.kind == "place":
                assert s.place not in all_text
            else:
                assert s.hidden.value not in all_text
                assert s.hidden.character in s.shots[0].cast
        for prev, cur in zip(s.shots, s.shots[1:]):
            assert (prev.framing, set(prev.cast)) != (cur.framing, set(cur.cast))
    assert len(words) < 45, sorted(words)  # a tiny text encoder must learn this vocabulary
    share = np.mean([s.hidden is not None for s in stories])
    assert 0.3 < share < 0.5
    kinds = {s.hidden.kind for s in stories if s.hidden}
    assert kinds == {"place", "colour"}


def test_eval_split_is_held_out():
    train = {s.to_dict()["texture_seed"] for s in make_split("train", 500)}
    ev5, ev10 = make_split("eval5", 50), make_split("eval10", 20)
    assert {s.num_shots for s in ev5} == {5} and {s.num_shots for s in ev10} == {10}
    assert not train & {s.texture_seed for s in ev5 + ev10}
    with pytest.raises(ValueError, match="eval5"):
        make_split("eval5", 3, num_shots=4)


def test_render_shapes_and_other_geometry():
    s = make_story(5, 3)
    frames, ranges = render_story(s, GEOMETRY)
    assert frames.dtype == np.uint8 and frames.shape == (3 * 33, 64, 64, 3)
    assert ranges == [(0, 33), (33, 66), (66, 99)]
    g = ShotGeometry(48, 96, 9, 8)  # any valid geometry works
    s2 = make_story(5, 2, aspect=2.0)
    f2, r2 = render_story(s2, g)
    assert f2.shape == (18, 48, 96, 3) and r2 == [(0, 9), (9, 18)]
    inside = render_shot(s, 0, GEOMETRY)
    assert np.array_equal(inside, frames[:33])
    # the background of a shot is static: only pixels near the characters ever change
    changed = (np.abs(np.diff(frames[:33].astype(int), axis=0)).max(-1) > 0).any(0)
    assert changed.mean() < 0.5


# --- the analyser on the truth and on corrupted videos -----------------------------------------------

def _check_truth(metrics):
    for k in ("adherence", "memory", "cut_f1", "flicker"):
        assert metrics[k] >= 0.99, (k, metrics)
    assert abs(metrics["drift"]) <= 0.01, metrics


def test_ground_truth_scores(tmp_path):
    stories = make_split("eval5", 24) + make_split("eval10", 6)
    metrics = score_all(stories, lambda i, s, f, r: codec_roundtrip(f, tmp_path))
    assert metrics["counts"]["memory_shots"] >= 20
    _check_truth(metrics)


@slow
def test_ground_truth_scores_many(tmp_path):
    stories = make_split("eval5", 200) + make_split("eval10", 50)
    metrics = score_all(stories, lambda i, s, f, r: codec_roundtrip(f, tmp_path))
    print(json.dumps(metrics, indent=1))
    _check_truth(metrics)


# --- short shots: every legal length the analyser can read (4k+1 frames, from 5) -------------------------

def _short(preset: str, frames: int) -> ShotGeometry:
    """A preset's frame size with `frames` frames a shot (what `storyworld make --frames` renders)."""
    return get_preset(preset).geometry.replace(frames_per_shot=frames)


@pytest.mark.parametrize("preset", ["tiny", "micro"])
def test_short_shots_ground_truth_finds_every_cut(tmp_path, preset):
    """5-frame shots: a cut's baseline window stops short of the next cut. With a fixed 8-frame window a
    moving shot between still ones read as a row of cuts, and the truth scored cut F1 0.96."""
    geometry = _short(preset, 5)
    stories = make_split("eval5", 24) + make_split("eval10", 6)
    m = score_all(stories, lambda i, s, f, r: codec_roundtrip(f, tmp_path), geometry)
    assert m["cut_f1"] >= 0.99 and m["counts"]["cuts_spurious"] == 0, m
    if preset == "tiny":  # 32x32 reads small shapes less well at any length; its cuts are what is checked
        _check_truth(m)


def test_short_shots_bad_input_still_fails():
    """At 5 frames a shot, frames shuffled across shots, and a story with no cut whose character moves at
    the short shots' speed all along, still score badly: the shorter window does not take motion for cuts."""
    geometry, rng = _short("tiny", 5), np.random.default_rng(0)
    stories = make_split("eval10", 12)
    shuffled = score_all(stories, lambda i, s, f, r: f[rng.permutation(len(f))], geometry)
    assert shuffled["cut_f1"] < 0.3 and shuffled["flicker"] < 0.9, shuffled
    assert shuffled["adherence_by_item"]["motion"] < 0.5 and shuffled["adherence"] < 0.8, shuffled

    def no_cuts(i, s, f, r):  # the first moving shot played back and forth for the whole video
        a, b = r[next(k for k, shot in enumerate(s.shots) if shot.motion != "still")]
        there_and_back = np.concatenate([np.arange(a, b), np.arange(b - 2, a, -1)])
        return f[np.resize(there_and_back, len(f))]

    m = score_all(stories, no_cuts, geometry)
    assert m["cut_f1"] == 0.0 and m["counts"]["cuts_detected"] == 0, m


def test_one_frame_shots_raise_a_clear_error(tmp_path):
    """1-frame shots: every frame change is a cut, so noise would score a perfect cut F1, and motion and
    flicker have nothing to compare. The analyser refuses them and names the lengths that work; the CLI
    says so without a traceback."""
    from training.storyworld import detect_cuts
    from training.storyworld.analyse import MIN_SHOT_FRAMES

    story = make_story(4, 5)
    frames, ranges = render_story(story, _short("tiny", 1))
    with pytest.raises(ValueError, match=r"5 of 5 shots are too short .* 5, 9, 13, \.\.\."):
        score_story(story, frames, ranges)
    with pytest.raises(ValueError, match="--frames 5"):
        detect_cuts(frames, shortest_shot=1)
    assert MIN_SHOT_FRAMES <= 1 + VAE_TEMPORAL_STRIDE  # the next legal length is analysable
    stories = tmp_path / "stories"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    made = subprocess.run([sys.executable, "-m", "training.storyworld", "make", "--out", str(stories), "--stories",
                           "1", "--frames", "1", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert made.returncode == 0 and "1-frame shots cannot be scored" in made.stderr, made.stderr
    scored = subprocess.run([sys.executable, "-m", "training.storyworld", "score", "--stories", str(stories),
                             "--videos", str(stories), "--out", str(tmp_path / "m.json")],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert scored.returncode != 0 and "Traceback" not in scored.stderr, scored.stderr
    assert "shots are too short" in scored.stderr and "5, 9, 13" in scored.stderr, scored.stderr


def test_blurry_noisy_truth_still_reads():
    """A generated video is soft: the truth blurred (Gaussian 1.5 px) with static-free noise still reads,
    and only flicker (which must see the per-frame noise) drops."""
    from PIL import ImageFilter
    rng = np.random.default_rng(3)

    def soften(i, s, f, r):
        out = np.stack([np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5))) for x in f])
        return np.clip(out + rng.normal(0, 4, f.shape), 0, 255).astype(np.uint8)

    m = score_all(make_split("eval5", 8), soften)
    assert m["adherence"] >= 0.95 and m["memory"] >= 0.95 and m["cut_f1"] >= 0.95, m
    assert 0.6 < m["flicker"] < 0.95, m


def _swapped(story):
    """The story with shots 2.. rendered in other colours (and, when the place is hidden, another place)."""
    used = {c.colour for c in story.characters}
    spare = [c for c in COLOURS if c not in used]
    chars = tuple(dataclasses.replace(c, colour=spare[i]) for i, c in enumerate(story.characters))
    other = next(p for p in PLACES if p != story.place)
    return dataclasses.replace(story, characters=chars, place=other if story.hides_place else story.place)


@pytest.fixture(scope="module")
def corruption_stories():
    stories = make_split("eval10", 12)
    assert sum(s.hidden is not None for s in stories) >= 3
    return stories


def test_shuffled_frames_fail(corruption_stories):
    rng = np.random.default_rng(0)
    m = score_all(corruption_stories, lambda i, s, f, r: f[rng.permutation(len(f))])
    assert m["cut_f1"] < 0.3, m
    assert m["flicker"] < 0.9, m
    assert m["adherence_by_item"]["motion"] < 0.5, m
    assert m["adherence"] < 0.8, m


def test_a_flash_at_each_shots_first_frame_costs_cut_f1_and_is_counted_at_the_opening(corruption_stories):
    """Each shot's frame 0 recoloured (what a VAE whose single-frame path differs from its chunks does): the
    later shots' flashes fall on their true cuts, but the video's opening one is a spurious cut, counted as
    such; the truth has none."""
    stories = corruption_stories[:6]

    def flash(i, s, f, r):
        f = f.copy()
        for a, _ in r:
            f[a] = np.clip(f[a].astype(int) + 60, 0, 255).astype(np.uint8)
        return f

    truth = score_all(stories, lambda i, s, f, r: f)
    flashed = score_all(stories, flash)
    assert truth["counts"]["cuts_spurious"] == 0 and truth["counts"]["cuts_spurious_opening"] == 0, truth
    assert flashed["counts"]["cuts_spurious_opening"] == len(stories), flashed
    assert flashed["counts"]["cuts_missed"] == 0 and flashed["cut_f1"] < 0.97, flashed


def test_colours_swapped_between_shots_fail(corruption_stories):
    def swap(i, s, f, r):
        other = _swapped(s)
        return np.concatenate([f[: r[0][1]]] + [render_shot(other, k, GEOMETRY) for k in range(1, s.num_shots)])

    m = score_all(corruption_stories, swap)
    assert m["memory"] < 0.1, m  # every later shot contradicts shot 1
    assert m["adherence_by_item"]["character"] < 0.3, m
    assert m["cut_f1"] > 0.99 and m["flicker"] > 0.99  # what was not corrupted still scores


def test_memory_splits_by_hidden_attribute_and_its_error_counts_stories(corruption_stories):
    """Moving only the place-hiding stories to another place after shot 1 fails memory on those and
    nowhere else; the split says which, and the story-clustered error sees that the misses come as whole
    stories, where the truth has no error at all."""
    def move_place(i, s, f, r):
        if not s.hides_place:
            return f
        other = dataclasses.replace(s, place=next(p for p in PLACES if p != s.place))
        return np.concatenate([f[: r[0][1]]] + [render_shot(other, k, GEOMETRY) for k in range(1, s.num_shots)])

    truth = score_all(corruption_stories, lambda i, s, f, r: f)
    assert set(truth["memory_by_kind"]) == {"place", "colour"}, truth
    assert min(truth["memory_by_kind"].values()) >= 0.99 and truth["memory_stderr"] == 0.0, truth
    m = score_all(corruption_stories, move_place)
    assert m["memory_by_kind"]["place"] < 0.1 and m["memory_by_kind"]["colour"] >= 0.99, m
    kinds = m["counts"]["memory_shots_by_kind"]
    assert sum(kinds.values()) == m["counts"]["memory_shots"] and m["counts"]["memory_stories"] >= 3, m
    assert abs(m["memory"] - kinds["colour"] / m["counts"]["memory_shots"]) < 1e-9, m
    assert m["memory_stderr"] > 0.1, m


def test_the_hidden_colour_character_is_one_left_of_its_shape_and_memory_needs_it_alone(monkeypatch):
    """The character whose colour is hidden is a detection of its shape left once the stated ones are
    matched: never a stated character's detection, nor a blob of another shape (a model that draws one
    fixed blob would keep "its" colour perfectly). Memory compares its colour with shot 1's only where one
    detection can be it: with two of its shape, whichever comes first in the palette, the shot is a miss."""
    from training.storyworld.analyse import Detection, ShotAnalysis, identify_cast, score_story

    story = next(s for s in make_split("eval5", 200) if s.hidden is not None and s.hidden.kind == "colour"
                 and len(s.characters) == 2)
    h = story.hidden.character
    stated = story.characters[1 - h]
    shape = story.characters[h].shape
    spare = [c for c in COLOURS if c not in (stated.colour, story.hidden.value)]

    def blob(colour, form):
        return Detection(colour, form, "medium", 0.3, "still", (0.0, 0.0), 1.0)

    def identify(*detections):
        matched, candidates = identify_cast(ShotAnalysis(story.place, 1.0, list(detections)), story, (0, 1))
        return matched[h], candidates

    kept = blob(story.hidden.value, shape)
    assert identify(blob(stated.colour, stated.shape), kept) == (kept, [kept])
    other = blob(spare[0], shape)
    for order in ((kept, other), (other, kept)):
        assert identify(blob(stated.colour, stated.shape), *order)[1] == list(order)  # two can be it
    assert identify(blob(stated.colour, shape)) == (None, [])  # the stated character's colour: taken
    assert identify(blob(story.hidden.value, stated.shape if stated.shape != shape else "circle")) == (None, [])

    # memory over a whole story: every later shot showing the hidden character with a same-shaped double
    frames, ranges = render_story(story, GEOMETRY)
    truth = score_story(story, frames, ranges)
    assert truth.memory_items and all(truth.memory_items)
    import training.storyworld.analyse as analyse

    real = analyse.analyse_video

    def with_double(frames, ranges):
        video = real(frames, ranges)
        for shot in video.shots[1:]:
            mine = next((d for d in shot.characters if d.shape == shape), None)
            if mine is not None:
                shot.characters.append(dataclasses.replace(mine, colour=spare[0]))  # after it: old rules took it
        return video

    monkeypatch.setattr(analyse, "analyse_video", with_double)
    doubled = score_story(story, frames, ranges)
    assert len(doubled.memory_items) == len(truth.memory_items) and not any(doubled.memory_items)


def test_clustered_stderr_grows_when_a_story_hits_or_misses_as_a_whole():
    from training.storyworld.analyse import clustered_stderr

    whole = clustered_stderr([[1, 1, 1, 1], [0, 0, 0, 0]])  # two stories, each all right or all wrong
    mixed = clustered_stderr([[1, 0, 1, 0], [0, 1, 0, 1]])  # same items, each story half right
    assert whole == pytest.approx(0.5) and mixed == pytest.approx(0.0)
    assert clustered_stderr([[1, 0, 1]]) is None and clustered_stderr([[1], []]) is None


def test_noise_fails(corruption_stories):
    rng = np.random.default_rng(1)
    m = score_all(corruption_stories, lambda i, s, f, r: rng.integers(0, 256, f.shape, dtype=np.uint8))
    for k in ("adherence", "memory", "cut_f1", "flicker"):
        assert m[k] < 0.1, (k, m)


def test_decay_in_later_shots_shows_as_drift(corruption_stories):
    rng = np.random.default_rng(2)

    def decay(i, s, f, r):
        f = f.copy()
        f[r[5][0]:] = rng.integers(0, 256, f[r[5][0]:].shape, dtype=np.uint8)
        return f

    m = score_all(corruption_stories, decay)
    assert m["drift"] < -0.8, m


# --- on-disk format and the reader -------------------------------------------------------------------

@pytest.mark.parametrize("gap", [0, 3])
def test_write_then_read_back(tmp_path, gap):
    story = make_story(77, 4)
    row = write_story(story, tmp_path, "0001", GEOMETRY, gap=gap)
    from training.storyworld.storage import write_index
    write_index(tmp_path, [row])
    truth, ranges = render_story(story, GEOMETRY, gap=gap)
    (rec,) = read_index(tmp_path / "index.csv")
    assert rec.ranges == ranges
    clip = rec.read()
    assert clip.frames.shape == truth.shape
    assert np.abs(clip.frames.astype(int) - truth).mean() < 4  # codec error only
    assert clip.global_caption == story.global_caption and clip.shot_captions == list(story.shot_captions)
    assert clip.fps == GEOMETRY.fps
    for k, (a, b) in enumerate(ranges):  # flags follow absolute ranges; gap frames belong to no shot
        assert (clip.shot_flags[a:b] == k).all()
    gaps = np.ones(len(truth), bool)
    for a, b in ranges:
        gaps[a:b] = False
    assert (clip.shot_flags[gaps] == -1).all() and gaps.sum() == 3 * gap
    caps = json.loads((tmp_path / "0001.json").read_text())
    assert caps["video_path"] == "0001.mp4" and caps["shot4"] == story.shot_captions[3]
    # resize while decoding, for training at another geometry
    small = read_story_clip(rec.video_path, rec.json_path, rec.ranges, size=(32, 48))
    assert small.frames.shape[1:] == (32, 48, 3)


def test_a_video_encodes_to_the_same_mp4_every_time():
    """A training set rebuilt from its seed must be the same files: with x264's macroblock tree on, 12
    encodes of this clip in a fresh process gave 7 to 9 different files (61 of the 600 tiny-set videos
    differed on a rebuild; under pytest's own process it shows far less often)."""
    code = """
import hashlib, sys, tempfile
sys.path.insert(0, "tests")
from test_video import clip
from shotstream_core.video import to_uint8
from training.storyworld.storage import write_mp4
frames, digests = to_uint8(clip(33, 64, 64)), set()
with tempfile.TemporaryDirectory() as tmp:
    for k in range(12):
        write_mp4(f"{tmp}/v.mp4", frames, 16.0)
        digests.add(hashlib.sha256(open(f"{tmp}/v.mp4", "rb").read()).hexdigest())
print(len(digests))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-1] == "1", f"{res.stdout.split()[-1]} different files from one clip"


def test_reader_rejects_bad_ranges_and_captions(tmp_path):
    with pytest.raises(ValueError, match="overlap"):
        validate_ranges([(0, 10), (5, 20)])
    with pytest.raises(ValueError, match="only"):
        validate_ranges([(0, 10)], num_frames=5)
    assert shot_flags([(2, 4), (6, 7)], 8).tolist() == [-1, -1, 0, 0, -1, -1, 1, -1]
    story = make_story(3, 2)
    row = write_story(story, tmp_path, "a", GEOMETRY)
    caps = json.loads((tmp_path / "a.json").read_text())
    del caps["shot2"]
    (tmp_path / "a.json").write_text(json.dumps(caps))
    with pytest.raises(ValueError, match="shot1..shot2"):
        read_story_clip(tmp_path / "a.mp4", tmp_path / "a.json", json.loads(row["frame_number"]))


# --- CLI -----------------------------------------------------------------------------------------------

def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "training.storyworld", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)


def test_cli_make_score_sheet(tmp_path):
    stories, videos = tmp_path / "stories", tmp_path / "videos"
    _cli("make", "--out", str(stories), "--stories", "3", "--seed", "9", "--shots", "2-4", "--quiet")
    rows = read_index(stories / "index.csv")
    assert len(rows) == 3 and all(2 <= len(r.ranges) <= 4 for r in rows)
    # "generated" videos: the truth for two stories, noise for the third
    videos.mkdir()
    for i, r in enumerate(rows):
        frames, _ = read_mp4(r.video_path)
        if i == 2:
            frames = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
        write_mp4(videos / f"{r.name}.mp4", frames, GEOMETRY.fps)
    _cli("score", "--stories", str(stories), "--videos", str(videos), "--out", str(tmp_path / "m.json"))
    m = json.loads((tmp_path / "m.json").read_text())
    per = {s["name"]: s["adherence"] for s in m["stories"]}
    assert per[rows[0].name] > 0.99 and per[rows[2].name] < 0.2
    _cli("sheet", str(stories / rows[0].name), "--out", str(tmp_path / "sheet.png"))
    _cli("sheet", str(videos / f"{rows[1].name}.mp4"), "--out", str(tmp_path / "bare.png"))  # cuts found
    img = Image.open(tmp_path / "sheet.png")
    assert img.width >= 4 * 128 and img.height >= len(rows[0].ranges) * 128
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _cli("make", "--out", str(tmp_path / "x"), "--stories", "1", "--seed", "20250917")
    assert "is the evaluation seed" in refused.value.stderr
    with pytest.raises(subprocess.CalledProcessError) as refused:
        _cli("make", "--out", str(tmp_path / "y"), "--stories", "1", "--split", "eval5", "--shots", "3")
    assert "--shots does not apply to --split eval5" in refused.value.stderr


def test_cli_train_split_rebuilds_the_training_set(tmp_path):
    """make --split train --shots 2-4: the stories training.data renders for the tiny data set."""
    from training.storyworld.world import training_stories

    _cli("make", "--out", str(tmp_path), "--stories", "4", "--split", "train", "--shots", "2-4", "--quiet",
         "--preset", "micro")
    rows = read_index(tmp_path / "index.csv")
    want = training_stories(4, 2, 4)
    assert [len(r.ranges) for r in rows] == [s.num_shots for s in want]
    assert [r.read().global_caption for r in rows] == [s.global_caption for s in want]


def test_write_stories_index(tmp_path):
    csv_path = write_stories(make_split("train", 2, num_shots=3), tmp_path, GEOMETRY)
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "shot_num_from_caption,json_path,video_path,frame_number"
    assert lines[1] == '3,0001.json,0001.mp4,"[[0, 33], [33, 66], [66, 99]]"'


_TIED_SHAPES = """
import numpy as np
from training.storyworld.analyse import analyse_shot
from training.storyworld.render import shape_coverage
from training.storyworld.world import COLOURS, PLACES
sky, ground = (np.array(c, float) for c in next(iter(PLACES.values())))
colour = np.array(next(iter(COLOURS.values())), float)
c = np.arange(64) + 0.5 - 32
frames = np.empty((8, 64, 64, 3), np.uint8)
for f in range(8):
    bg = np.where((np.arange(64) < 36)[:, None, None], sky, ground) * np.ones((64, 64, 3))
    a = shape_coverage("circle" if f < 4 else "square", c[None, :], c[:, None], 10.0)[..., None]
    frames[f] = (a * colour + (1 - a) * bg).round()
print(analyse_shot(frames)[0].characters[0].shape)
"""


def test_a_shape_tie_is_broken_the_same_way_in_every_process():
    """A character read as a circle in half its shape samples and a square in the other half: the first
    read wins, whatever the process's string-hash seed (a tie broken over a set followed that seed, and
    the same video scored differently from run to run)."""
    repo = Path(__file__).resolve().parents[1]
    seen = set()
    for seed in ("0", "1", "2", "3", "4", "5"):
        res = subprocess.run([sys.executable, "-c", _TIED_SHAPES], cwd=repo, capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        seen.add(res.stdout.strip())
    assert seen == {"circle"}, seen
