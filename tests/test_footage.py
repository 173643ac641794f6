"""A story from the user's own frames: fitting footage to a story, and later shots conditioned on it."""
import json
import re
import warnings

import numpy as np
import pytest
import torch

from shotstream_core.engine import ShotRequest
from shotstream_core.loading import load_engine
from shotstream_core.state import StoryState
from shotstream_core.video import fit_frames

G = "a red circle and a blue square on a meadow."
CAPTIONS = ["wide shot, the red circle moves left", "close-up, the blue square is still", "medium shot, both move up"]


@pytest.fixture(scope="module")
def engine():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_engine(preset="micro", device="cpu")


@pytest.fixture(scope="module")
def story(engine):
    return engine.generate_story(G, CAPTIONS[:2], seeds=[11, 12])


def next_shot(engine, state, seed=13):
    return engine.generate_shot(state, ShotRequest(G, CAPTIONS[2], seed=seed))[1]


# --- fitting -------------------------------------------------------------------------------------------

def test_frames_of_the_storys_size_and_length_pass_unchanged():
    frames = torch.randint(0, 256, (9, 16, 24, 3), dtype=torch.uint8)
    assert torch.equal(fit_frames(frames, 16, 24, 9), frames)
    as_float = fit_frames(frames.float() / 255, 16, 24, 9)  # ComfyUI's IMAGE: float in [0, 1]
    assert torch.equal(as_float, frames)


def test_one_image_becomes_a_still_shot():
    image = np.zeros((32, 32, 3), np.float32)
    image[8:24, 8:24] = (1.0, 0.0, 0.0)
    shot = fit_frames(image, 16, 16, 5)
    assert shot.shape == (5, 16, 16, 3) and shot.dtype == torch.uint8
    assert all(torch.equal(f, shot[0]) for f in shot)
    assert shot[0, 8, 8].tolist() == [255, 0, 0] and shot[0, 0, 0].tolist() == [0, 0, 0]  # the square, halved


def test_frames_are_taken_evenly_over_the_clip_first_and_last_kept():
    clip = torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1).expand(9, 4, 4, 3) * 20  # frame i has value 20 i
    picked = fit_frames(clip, 4, 4, 5)[:, 0, 0, 0] // 20
    assert picked.tolist() == [0, 2, 4, 6, 8]
    stretched = fit_frames(clip[:3], 4, 4, 5)[:, 0, 0, 0] // 20  # shorter footage repeats frames in order
    assert stretched.tolist() == [0, 0, 1, 2, 2]


def test_another_aspect_is_centre_cropped_not_stretched():
    # 64 wide, 32 high into a square: the outer 16 columns each side fall away; a stretch would keep them.
    frames = torch.zeros(1, 32, 64, 3, dtype=torch.uint8)
    frames[..., :16, 2] = 255  # blue left edge
    frames[..., 48:, 2] = 255  # blue right edge
    frames[..., 16:48, 1] = 255  # green centre
    square = fit_frames(frames, 16, 16, 1)[0]
    assert square[..., 2].max() == 0 and square[..., 1].min() == 255
    tall = fit_frames(frames.transpose(1, 2), 16, 16, 1)[0]  # 32 wide, 64 high: rows are cropped instead
    assert tall[..., 2].max() == 0 and tall[..., 1].min() == 255


def test_a_larger_source_is_filtered_not_aliased():
    # A one-pixel checkerboard shrunk 3x is its mean grey; a filter without antialiasing samples one source
    # pixel per output pixel at this factor and keeps black and white.
    board = ((torch.arange(48)[:, None] + torch.arange(48)[None]) % 2 * 255).to(torch.uint8)
    frames = board[None, :, :, None].expand(1, 48, 48, 3)
    small = fit_frames(frames, 16, 16, 1).float()
    assert (small - 127.5).abs().max() <= 2


@pytest.mark.parametrize("frames, problem", [
    (torch.zeros(0, 16, 16, 3), "no frames to fit"),
    (torch.zeros(2, 16, 16, 4), "RGB, channels last"),
    (torch.full((2, 16, 16, 3), float("nan")), "NaN or infinite"),
    (np.zeros((2, 16, 16, 3), np.int32), "float in [0, 1] or uint8"),
])
def test_bad_footage_is_refused_by_name(frames, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        fit_frames(frames, 16, 16, 5)


# --- the engine ----------------------------------------------------------------------------------------

def test_footage_conditions_later_shots_exactly_as_the_generated_shots_it_copies(engine, story):
    """A story rebuilt from the generated shots' frames, given as footage, continues bit for bit like the
    generated story: later shots see footage through the same global cache and prompts."""
    rebuilt = engine.new_story(story.geometry)
    for shot in story.shots:
        rebuilt = engine.add_footage(rebuilt, shot.frames.float() / 255, shot.global_caption, shot.caption)
    assert [s.source for s in rebuilt.shots] == ["footage", "footage"]
    assert [s.flag for s in rebuilt.shots] == [s.flag for s in story.shots]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(rebuilt.shots, story.shots))
    assert torch.equal(next_shot(engine, rebuilt), next_shot(engine, story))


def test_the_footage_is_what_later_shots_see(engine, story):
    # The check above can fail: other footage under the same captions gives another next shot.
    other = engine.new_story(story.geometry)
    for shot in story.shots:
        other = engine.add_footage(other, shot.frames.flip(2), shot.global_caption, shot.caption)
    assert not torch.equal(next_shot(engine, other), next_shot(engine, story))


def test_footage_of_any_size_starts_a_story_that_goes_on(engine):
    geo = engine.geometry
    image = torch.rand(3 * geo.height, 2 * geo.width, 3)  # another size and aspect, one image
    state = engine.add_footage(engine.new_story(), image, G, CAPTIONS[0])
    assert state.num_shots == 1 and state.shots[0].frames.shape == (geo.frames_per_shot, geo.height, geo.width, 3)
    after, frames = engine.generate_shot(state, ShotRequest(G, CAPTIONS[1], seed=3))
    assert after.num_shots == 2 and after.shots[0] is state.shots[0] and frames.shape[0] == geo.frames_per_shot
    assert [s.source for s in after.shots] == ["footage", "generated"]


def test_bad_footage_calls_leave_the_story_as_it_was(engine, story):
    before = list(story.shots)
    with pytest.raises(ValueError, match="caption is empty"):
        engine.add_footage(story, story.shots[0].frames, G, "  ")
    with pytest.raises(ValueError, match="NaN or infinite"):
        engine.add_footage(story, torch.full((3, 8, 8, 3), float("inf")), G, CAPTIONS[0])
    foreign = StoryState("someothermodel", story.geometry, story.shots)
    with pytest.raises(ValueError, match="not the loaded model"):
        engine.add_footage(foreign, story.shots[0].frames, G, CAPTIONS[0])
    assert list(story.shots) == before


# --- the story state -------------------------------------------------------------------------------------

def test_a_footage_shot_is_saved_shown_and_loaded_as_footage(engine, story, tmp_path):
    state = engine.add_footage(story, story.shots[0].frames, G, "the meadow again")
    assert "footage" in state.summary().splitlines()[-1] and "seed" not in state.summary().splitlines()[-1]
    loaded = StoryState.load(state.save(tmp_path / "s"))
    assert loaded == state and [s.source for s in loaded.shots] == ["generated", "generated", "footage"]
    assert torch.equal(next_shot(engine, loaded), next_shot(engine, state))


def test_a_state_saved_before_sources_loads_as_generated_and_an_unknown_source_is_refused(story, tmp_path):
    path = story.save(tmp_path / "s")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 2
    for shot in meta["shots"]:
        del shot["source"]
    meta_path.write_text(json.dumps(meta))
    assert StoryState.load(path) == story
    meta["format_version"] = 3
    meta["shots"][1]["source"] = "dreamt"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shot 2: a shot's source is one of generated, footage, not 'dreamt'"):
        StoryState.load(path)
