"""CLI end to end on the micro preset, and the attention backend choice."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shotstream_core.attention import attention, resolve_backend
from shotstream_core.state import StoryState
from shotstream_core.video import read_video

REPO = Path(__file__).resolve().parents[1]


def test_cli_generates_a_story_video(tmp_path):
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"global_caption": "a red circle on a meadow.", "shot1": "wide shot, still",
                                 "shot2": "close-up, moves left"}))
    out = tmp_path / "story.mp4"
    proc = subprocess.run([sys.executable, "-m", "shotstream_core", "generate", str(story), "--out", str(out),
                           "--model", "micro", "--seed", "3", "--save-state", str(tmp_path / "state")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    frames, fps = read_video(out)
    assert frames.shape == (2 * 21, 32, 32, 3) and fps == 16
    assert "random weights" in proc.stderr  # the micro preset has no trained weights, and says so
    assert (tmp_path / "state.safetensors").exists() and (tmp_path / "state.json").exists()
    # the video holds the saved story's frames in order: nearer to them than to them one frame or one shot out of step
    story_frames = StoryState.load(tmp_path / "state.safetensors").frames()
    error = lambda ref: float((torch.as_tensor(frames).float() / 255 - ref).abs().mean())  # noqa: E731
    assert error(story_frames) < 0.8 * min(error(story_frames.roll(1, 0)), error(story_frames.roll(21, 0)))  # 21 frames a micro shot


def test_cli_bad_frames_is_one_clear_line(tmp_path):
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"global_caption": "g", "shot1": "s"}))
    proc = subprocess.run([sys.executable, "-m", "shotstream_core", "generate", str(story), "--out",
                           str(tmp_path / "x.mp4"), "--model", "micro", "--frames-per-shot", "20"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "4k+1" in proc.stderr and "Traceback" not in proc.stderr
    earlier = tmp_path / "earlier.mp4"  # a run that fails before writing leaves an existing video alone
    earlier.write_bytes(b"last run's video")
    proc = subprocess.run([sys.executable, "-m", "shotstream_core", "generate", str(story), "--out", str(earlier),
                           "--model", "micro", "--frames-per-shot", "20"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and earlier.read_bytes() == b"last run's video"
    missing = tmp_path / "missing_ckpt.pt"  # a mistyped path is not taken for a preset name
    proc = subprocess.run([sys.executable, "-m", "shotstream_core", "generate", str(story), "--out",
                           str(tmp_path / "x.mp4"), "--model", str(missing)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "no such file" in proc.stderr and "random weights" not in proc.stderr


def test_backend_resolution_and_errors():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cpu") == "sdpa"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("flash_attn_2", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("xformers", "cpu")


def test_sdpa_matches_explicit_softmax_attention_with_mask():
    q, k, v = torch.randn(2, 5, 3, 8), torch.randn(2, 7, 3, 8), torch.randn(2, 7, 3, 8)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 8**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    torch.testing.assert_close(attention(q, k, v, "sdpa", mask), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("story, problem", [
    ({"global_caption": "g", "shot1": "a", "shot3": "c"}, "shot2 missing (found shot1, shot3)"),
    ({"global_caption": "g", "shot2": "b"}, "shot1 missing"),
    ({"global_caption": "g", "shot1": "a", "shot2": " "}, "shot2 is empty"),
    ({"global_caption": "g", "shot1": 5}, "shot1 must be text"),
    ({"shot1": "a"}, "missing 'global_caption'"),
    ({"global_caption": "g"}, "no shot captions"),
    (None, "no such story file"),
    ("{not json", "not valid JSON"),
])
def test_story_file_problems_are_named_before_any_model_loads(tmp_path, story, problem):
    from shotstream_core.__main__ import read_story

    path = tmp_path / "story.json"
    if story is not None:
        path.write_text(story if isinstance(story, str) else json.dumps(story))
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_story(path)


def test_story_file_shots_are_read_in_number_order(tmp_path):
    from shotstream_core.__main__ import read_story

    path = tmp_path / "story.json"
    path.write_text(json.dumps({"global_caption": "g", "shot2": "b", "shot10": "j", "shot1": "a",
                                **{f"shot{n}": str(n) for n in range(3, 10)}}))
    assert read_story(path) == ("g", ["a", "b", *map(str, range(3, 10)), "j"])
