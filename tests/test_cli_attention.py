"""CLI end to end on the micro preset, and the attention backend choice."""
import json
import re
import signal
import subprocess
import sys
import threading
import time
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
                           "--model", "micro", "--seed", "3", "--save-state", str(tmp_path / "state.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    frames, fps = read_video(out)
    assert frames.shape == (2 * 21, 32, 32, 3) and fps == 16
    assert "random weights" in proc.stderr  # the micro preset has no trained weights, and says so
    assert "note: no trained weights" in proc.stderr and "UserWarning" not in proc.stderr  # one line, no file:line
    # --save-state state.json: the suffix is dropped, not doubled (state.json.safetensors + state.json.json)
    assert sorted(p.name for p in tmp_path.glob("state*")) == ["state.json", "state.safetensors"]
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


def write_story(tmp_path, shots=1, global_caption="a red circle on a meadow.") -> Path:
    story = tmp_path / "story.json"
    story.write_text(json.dumps({"global_caption": global_caption,
                                 **{f"shot{n}": f"shot number {n}, the circle moves" for n in range(1, shots + 1)}}))
    return story


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: argument checks must come before it."""
    import shotstream_core.loading

    def load_engine(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(shotstream_core.loading, "load_engine", load_engine)


@pytest.mark.parametrize("extra, problem", [
    (["--device", "banana"], "use auto, cpu, cuda, cuda:N or mps"),
    (["--seed", "-1"], "--seed must be in [0, 2**63)"),
    (["--seed", str(2**63)], "--seed must be in [0, 2**63)"),
    (["--frames-per-shot", "0"], "4k+1"),
    (["--size", "0x32"], "must be positive"),
    (["--size=-32x32"], "must be positive"),
    (["--threads", "-1"], "--threads"),
    (["--vae", "no_such_vae.pth"], "--vae no_such_vae.pth: no such file"),
    (["--text-encoder", "no_such_umt5"], "--text-encoder no_such_umt5: no such file"),
    (["--device", "mps"], "MPS (Apple GPU) is not available"),
    (["--save-state", "story.mp4/st"], "is a file, not a folder"),
    (["--footage", "no_such.png"], "--footage no_such.png: no such file"),
    (["--footage", "story.mp4"], "the story has no shot 2 to generate after it"),
])
def test_bad_arguments_are_one_line_before_the_model_loads(tmp_path, capsys, no_model, extra, problem, monkeypatch):
    from shotstream_core.__main__ import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "story.mp4").write_bytes(b"a file where --save-state wants a folder")

    assert main(["generate", str(write_story(tmp_path)), "--out", str(tmp_path / "x.mp4"), "--model", "micro",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1 and err.startswith("error: ")


def test_unreadable_footage_is_one_line_before_the_model_loads(tmp_path, capsys, no_model):
    from shotstream_core.__main__ import main

    (tmp_path / "start.png").write_bytes(b"not a picture")
    assert main(["generate", str(write_story(tmp_path, shots=2)), "--out", str(tmp_path / "x.mp4"),
                 "--model", "micro", "--footage", str(tmp_path / "start.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --footage: ") and "is not an image Pillow can read" in err and err.count("\n") == 1


def test_footage_is_shot_one_and_the_story_goes_on_from_it(tmp_path, capsys):
    from PIL import Image

    from shotstream_core.__main__ import main

    image = torch.zeros(96, 64, 3, dtype=torch.uint8)  # another size and aspect than micro's 32x32
    image[..., 0] = 200
    image[40:60, 20:44] = torch.tensor([20, 40, 220], dtype=torch.uint8)
    image[:16, :, 1] = image[80:, :, 1] = 255  # green bands the centre crop removes (a squash would keep them)
    Image.fromarray(image.numpy()).save(tmp_path / "start.png")
    out, saved = tmp_path / "story.mp4", tmp_path / "state"
    assert main(["generate", str(write_story(tmp_path, shots=3)), "--out", str(out), "--model", "micro",
                 "--threads", "1", "--footage", str(tmp_path / "start.png"), "--save-state", str(saved)]) == 0
    assert "wrote" in capsys.readouterr().out
    state = StoryState.load(saved)
    assert [s.source for s in state.shots] == ["footage", "generated", "generated"]
    still = state.shots[0].frames
    assert all(torch.equal(f, still[0]) for f in still)  # one image: a still shot
    assert still[0, 16, 16].tolist() == [20, 40, 220] and still[..., 1].max() == 40  # centre-cropped, not squashed
    frames, _ = read_video(out)
    assert frames.shape == (3 * 21, 32, 32, 3)
    assert (torch.as_tensor(frames[:21]).float() - still.float()).abs().mean() < 4  # the video opens with it


def test_save_state_is_checked_at_the_files_it_will_write(tmp_path, capsys, no_model):
    """--save-state story.v1 writes story.v1.safetensors + story.v1.json (the dot stays): those are checked."""
    from shotstream_core.__main__ import main

    (tmp_path / "story.v1.json").mkdir()
    assert main(["generate", str(write_story(tmp_path)), "--out", str(tmp_path / "x.mp4"), "--model", "micro",
                 "--save-state", str(tmp_path / "story.v1")]) == 2
    assert "story.v1.json is a directory" in capsys.readouterr().err


def test_bad_out_paths_are_refused_before_any_folder_is_made(tmp_path, capsys, no_model):
    from shotstream_core.__main__ import main

    story = str(write_story(tmp_path))
    assert main(["generate", story, "--out", str(tmp_path), "--model", "micro"]) == 2
    assert f"is a directory: give a file name like {tmp_path / 'story.mp4'}" in capsys.readouterr().err
    for name in ("new/story.avi", "new/story"):
        assert main(["generate", story, "--out", str(tmp_path / name), "--model", "micro"]) == 2
        assert "unsupported video type" in capsys.readouterr().err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("given, model, expected", [
    (None, "micro", 1), ("1", "micro", 1), ("2", "micro", 2), ("0", "micro", "torch default"),
    (None, "user checkpoint", "torch default"), ("2", "user checkpoint", 2),
])
def test_threads_default_to_one_for_bundled_models_on_the_cpu(tmp_path, monkeypatch, given, model, expected):
    """--threads N sets torch's CPU threads before the model loads; 0 keeps torch's default. Not given: 1 for
    a bundled model on the CPU (torch's own default of one a core ran 5-14x slower on a loaded 2-core
    machine), torch's default for a user's checkpoint (a big model's text encoder wants every core)."""
    import shotstream_core.loading
    from shotstream_core.__main__ import SMALL_MODEL_THREADS, main

    seen = []

    def load_engine(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr(shotstream_core.loading, "load_engine", load_engine)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        if model == "user checkpoint":
            model = tmp_path / "dit.safetensors"  # never read: load_engine stops first
            model.write_bytes(b"")
        argv = ["generate", str(write_story(tmp_path)), "--out", str(tmp_path / "x.mp4"), "--model", str(model),
                "--device", "cpu"]
        assert main(argv + (["--threads", given] if given else [])) == 2
    finally:
        torch.set_num_threads(before)
    assert SMALL_MODEL_THREADS == 1
    assert seen == [3 if expected == "torch default" else expected]


@pytest.mark.parametrize("text, base", [
    ("st", "st"), ("st.json", "st"), ("st.safetensors", "st"), ("a/st.JSON", "a/st"), ("st.v2", "st.v2"),
])
def test_save_state_path_drops_a_json_or_safetensors_suffix(text, base):
    from shotstream_core.__main__ import state_path

    assert state_path(text) == Path(base)


def test_engine_warnings_are_notes_and_number_shots_from_one(tmp_path, capsys):
    from shotstream_core.__main__ import main

    long_caption = " ".join(["a red circle rolls slowly across a wide green meadow under a pale sky"] * 4)
    story = write_story(tmp_path, shots=2, global_caption=long_caption)
    assert main(["generate", str(story), "--out", str(tmp_path / "x.mp4"), "--model", "micro"]) == 0
    err = capsys.readouterr().err
    assert "note: shot 1: prompt exceeds" in err and "note: shot 2: prompt exceeds" in err
    assert "shot 0" not in err and "UserWarning" not in err


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_is_one_line_and_leaves_the_earlier_video(tmp_path, sig, code):
    """Ctrl-C or SIGTERM mid-story: exit 128 + the signal, one line, no traceback, and the video already at
    --out byte for byte as it was (it used to be deleted; SIGTERM left a 48-byte unreadable mp4)."""
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"last run's good video")
    story = write_story(tmp_path, shots=400)  # far more than can finish before the signal
    proc = subprocess.Popen([sys.executable, "-m", "shotstream_core", "generate", str(story), "--out", str(out),
                             "--model", "micro"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    err = bytearray()
    reader = threading.Thread(target=lambda: [err.extend(c) for c in iter(lambda: proc.stderr.read1(4096), b"")],
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while b"shot 2/400" not in err:  # shot 1 is in the partial file
            assert proc.poll() is None and time.monotonic() < deadline, err.decode(errors="replace")[-2000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code, err.decode(errors="replace")[-2000:]
    finally:
        proc.kill()  # nothing if it has exited
        reader.join(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
    text = err.decode(errors="replace")
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.startswith("interrupted")]
    assert lines == [f"interrupted: nothing was written; {out} left as it was"], text[-2000:]
    assert "Traceback" not in text and text.rstrip().endswith(lines[0])
    assert out.read_bytes() == b"last run's good video"
    assert sorted(tmp_path.iterdir()) == sorted([out, story])  # and no partial file left beside it


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
    ({"global_caption": "g", "shot1": "a", "shot300000000": "typo"}, "shot2 missing (found shot1, shot300000000)"),
    (b'{"global_caption": "caf\xe9", "shot1": "a"}', "not UTF-8 text"),
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
    if isinstance(story, bytes):
        path.write_bytes(story)
    elif story is not None:
        path.write_text(story if isinstance(story, str) else json.dumps(story))
    with pytest.raises(ValueError, match=re.escape(problem)):
        read_story(path)


def test_story_file_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    import locale

    from shotstream_core.__main__ import read_story

    path = tmp_path / "story.json"
    path.write_bytes('\ufeff{"global_caption": "Une forêt la nuit.", "shot1": "La caméra avance."}'.encode("utf-8"))
    monkeypatch.setattr(locale, "getpreferredencoding", lambda *a, **k: "cp1252")  # what Windows gives
    assert read_story(path) == ("Une forêt la nuit.", ["La caméra avance."])


def test_story_file_shots_are_read_in_number_order(tmp_path):
    from shotstream_core.__main__ import read_story

    path = tmp_path / "story.json"
    path.write_text(json.dumps({"global_caption": "g", "shot2": "b", "shot10": "j", "shot1": "a",
                                **{f"shot{n}": str(n) for n in range(3, 10)}}))
    assert read_story(path) == ("g", ["a", "b", *map(str, range(3, 10)), "j"])
