"""The pack without a host: it imports, its node definitions are complete, and its nodes drive the engine.

Node functions are called directly, with the engine. Most behaviour is checked on the micro preset (fast);
one test goes through LoadShotStream with the bundled tiny model.
"""
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

from shotstream_core.loading import load_engine
from shotstream_core.state import StoryState

NODE_NAMES = {"LoadShotStream", "ShotPrompt", "NextShotGenerate", "ShotFromImages", "CacheState", "VideoCombine"}


@pytest.fixture(scope="module")
def nodes(pack):
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def host(pack):
    return pack.nodes.comfy_adapter


@pytest.fixture(scope="module")
def micro():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: no micro model is bundled
        return load_engine(preset="micro", device="cpu")


@pytest.fixture()
def out_dir(tmp_path, host):
    host.set_standalone_dirs(output=tmp_path)
    return tmp_path


def prompt(nodes, caption="wide shot, still.", seed=0, **kw):
    return nodes["ShotPrompt"]().build("a red circle.", caption, seed=seed, **kw)[0]


def shot(nodes, engine, p, state=None, geometry=None):
    g = geometry or engine.geometry
    return nodes["NextShotGenerate"]().generate(engine, p, g.width, g.height, g.frames_per_shot, state=state)["result"]


# --- the pack as a host sees it --------------------------------------------------------------------

def test_pack_imports_without_a_host(pack, host):
    assert set(pack.NODE_CLASS_MAPPINGS) == NODE_NAMES
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == NODE_NAMES
    assert not host.HAS_HOST and "folder_paths" not in sys.modules
    web = Path(pack.__file__).parent / pack.WEB_DIRECTORY
    assert list(web.glob("*.js")), "WEB_DIRECTORY holds the JS extension"


@pytest.mark.parametrize("name", sorted(NODE_NAMES))
def test_node_definition_is_complete(nodes, name):
    cls = nodes[name]
    assert cls.CATEGORY == "ShotStream" and len(cls.DESCRIPTION) > 40
    assert callable(getattr(cls(), cls.FUNCTION))
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
    types = cls.INPUT_TYPES()
    assert set(types) <= {"required", "optional", "hidden"}
    for group in ("required", "optional"):
        for input_name, spec in types.get(group, {}).items():
            assert len(spec) == 2 and spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


# --- validation ------------------------------------------------------------------------------------

def test_next_shot_validation_names_the_problem_and_the_fix(nodes):
    cls = nodes["NextShotGenerate"]
    assert cls.VALIDATE_INPUTS(width=64, height=64, frames_per_shot=33) is True
    msg = cls.VALIDATE_INPUTS(width=72, height=64, frames_per_shot=33)
    assert "divisible by 16" in msg and "72" in msg and "80" in msg
    msg = cls.VALIDATE_INPUTS(width=64, height=64, frames_per_shot=32)
    assert "4k+1" in msg and "29" in msg and "33" in msg
    assert cls.VALIDATE_INPUTS(width=None, height=None, frames_per_shot=None) is True  # linked: checked later
    # a shot that continues a state (hosts pass a connected input as None) leaves its size widgets unused
    assert cls.VALIDATE_INPUTS(width=72, height=64, frames_per_shot=32, state=None) is True


def test_shot_prompt_rejects_an_empty_caption(nodes):
    cls = nodes["ShotPrompt"]
    assert "caption is empty" in cls.VALIDATE_INPUTS(caption="   ", frames=0)
    assert "4k+1" in cls.VALIDATE_INPUTS(caption="ok", frames=10)
    assert cls.VALIDATE_INPUTS(caption="ok", frames=0) is True
    with pytest.raises(ValueError, match="caption is empty"):
        cls().build("g", "")


def test_missing_model_file_names_the_file_and_the_folders(nodes, host, tmp_path):
    host.set_standalone_dirs(models={"dit": [tmp_path / "shotstream"]})
    cls = nodes["LoadShotStream"]
    msg = cls.VALIDATE_INPUTS(dit_name="wan_missing.safetensors", vae_name="auto", text_encoder_name="auto")
    assert "wan_missing.safetensors" in msg and str(tmp_path / "shotstream") in msg and "bundled: tiny" in msg
    with pytest.raises(FileNotFoundError, match="wan_missing"):
        cls().load("wan_missing.safetensors", "auto", "auto")


def test_model_lists_come_from_the_model_folders(nodes, host, tmp_path):
    folder = tmp_path / "shotstream"
    folder.mkdir()
    (folder / "story_dit.safetensors").write_bytes(b"x")
    (folder / "notes.txt").write_text("not a model")
    host.set_standalone_dirs(models={"dit": [folder], "vae": [folder]})
    choices = nodes["LoadShotStream"].INPUT_TYPES()["required"]["dit_name"][0]
    assert choices == ["bundled: tiny", "story_dit.safetensors"]
    # a file that is there but is no DiT: a load error that says what the file is not
    with pytest.raises(ValueError, match="story_dit.safetensors"):
        nodes["LoadShotStream"]().load("story_dit.safetensors", "auto", "auto")


def test_loader_merges_a_lora_from_the_lora_folder(nodes, host, tmp_path):
    """lora_name/lora_strength: the bundled DiT with a PEFT LoRA merged at the given strength."""
    from safetensors.torch import save_file

    from shotstream_core.loading import bundled_path, load_dit_state

    base, cfg = load_dit_state(bundled_path("tiny", "dit"))
    key = "blocks.0.self_attn.q.weight"
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, cfg.dim, generator=g), torch.randn(base[key].shape[0], 2, generator=g)
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({"base_model.model.blocks.0.self_attn.q.lora_A.weight": a,
               "base_model.model.blocks.0.self_attn.q.lora_B.weight": b}, str(folder / "style.safetensors"))
    host.set_standalone_dirs(models={"lora": [folder]})
    cls = nodes["LoadShotStream"]
    assert cls.INPUT_TYPES()["optional"]["lora_name"][0] == ["none", "style.safetensors"]
    assert "gone.safetensors" in cls.VALIDATE_INPUTS("bundled: tiny", "auto", "auto", lora_name="gone.safetensors")
    engine = cls().load("bundled: tiny", "auto", "auto", lora_name="style.safetensors", lora_strength=0.5)["result"][0]
    merged = engine.dit.state_dict()[key]
    torch.testing.assert_close(merged, base[key] + 0.5 * (b @ a), rtol=1e-5, atol=1e-5)  # alpha = rank: scale 1
    plain = cls().load("bundled: tiny", "auto", "auto")["result"][0]
    assert torch.equal(plain.dit.state_dict()[key], base[key])
    # a LoRA made for another model is refused by name, not with a torch shape error
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)},
              str(folder / "wan13b.safetensors"))
    with pytest.raises(ValueError, match=r"is 1536x1536 \(rank 4\), but this DiT's blocks.0.self_attn.q.weight is "
                                         r"128x128: the LoRA was made for another model"):
        cls().load("bundled: tiny", "auto", "auto", lora_name="wan13b.safetensors")


def test_loader_notes_reach_the_node_every_time(nodes, host, tmp_path):
    """The loader's warnings (here: a teacher chosen as the streaming model) are the node's UI text, on
    every load, not once a process as Python's default filter would print them."""
    from shotstream_core.loading import bundled_path

    host.set_standalone_dirs(models={"dit": [bundled_path("tiny", "dit").parent]})
    for _ in range(2):
        out = nodes["LoadShotStream"]().load("teacher.safetensors", "auto", "auto")
        assert any("is a bidirectional teacher" in line for line in out["ui"]["text"]), out["ui"]
    assert nodes["LoadShotStream"]().load("bundled: tiny", "auto", "auto")["ui"]["text"] == []


# --- generation ------------------------------------------------------------------------------------

def test_first_shot_starts_a_story_and_streams_previews(nodes, micro):
    node = nodes["NextShotGenerate"]()
    state, frames = shot(nodes, micro, prompt(nodes))
    g = micro.geometry
    assert isinstance(state, StoryState) and state.num_shots == 1
    assert frames.shape == (g.frames_per_shot, g.height, g.width, 3) and 0 <= frames.min() <= frames.max() <= 1
    node.generate(micro, prompt(nodes), g.width, g.height, g.frames_per_shot)
    blocks = math.ceil(g.latent_frames / micro.sampler.block_frames)
    assert node.last_progress.previews == blocks  # one preview per decoded block
    assert node.last_progress.value == node.last_progress.total  # the bar reached the end


def test_a_caption_cut_to_the_models_text_length_is_shown_on_the_node(nodes, micro, capsys):
    """The tiny model reads 48 tokens and micro 16: a longer caption is cut, and the node says so (its UI
    text, which the web extension shows, and the host's log), numbering shots from 1; a short one says
    nothing."""
    g = micro.geometry
    out = nodes["NextShotGenerate"]().generate(micro, prompt(nodes), g.width, g.height, g.frames_per_shot)
    assert out["ui"]["text"] == [] and out["result"][0].num_shots == 1
    long = prompt(nodes, "wide shot, " + " ".join(["the red circle rolls slowly across the meadow"] * 4) + ".")
    out = nodes["NextShotGenerate"]().generate(micro, long, g.width, g.height, g.frames_per_shot)
    (note,) = out["ui"]["text"]
    assert note.startswith("shot 1:") and "exceeds" in note
    assert f"[ShotStream] note: {note}" in capsys.readouterr().err


def test_shots_never_mutate_the_incoming_state_and_are_deterministic(nodes, micro):
    s1, _ = shot(nodes, micro, prompt(nodes, seed=1))
    s2a, f2a = shot(nodes, micro, prompt(nodes, "medium shot, moving left.", seed=2), s1)
    assert s1.num_shots == 1 and s2a.num_shots == 2
    s2b, f2b = shot(nodes, micro, prompt(nodes, "medium shot, moving left.", seed=2), s1)
    assert torch.equal(f2a, f2b)  # same seeds, same state: same frames
    s2c, f2c = shot(nodes, micro, prompt(nodes, "close-up, moving up.", seed=3), s1)
    assert not torch.equal(f2a, f2c) and s1.num_shots == 1  # an edited shot 2 re-runs from the untouched shot 1


def test_two_chains_share_one_model_without_touching_each_other(nodes, micro):
    g = micro.geometry
    a1, _ = shot(nodes, micro, prompt(nodes, seed=1))
    _, a2_alone = shot(nodes, micro, prompt(nodes, "close-up, moving up.", seed=2), a1)
    # chain B (another size) runs on the same model between A's shots
    b1, fb = shot(nodes, micro, prompt(nodes, seed=7), geometry=g.replace(width=g.width + 16))
    a2, a2_frames = shot(nodes, micro, prompt(nodes, "close-up, moving up.", seed=2), a1)
    assert fb.shape[2] == g.width + 16 and b1.story_id != a1.story_id
    assert torch.equal(a2_frames, a2_alone) and a1.num_shots == 1 and b1.num_shots == 1


def test_interrupt_leaves_the_state_and_a_rerun_matches(nodes, micro, host, monkeypatch):
    s1, _ = shot(nodes, micro, prompt(nodes, seed=1))
    _, reference = shot(nodes, micro, prompt(nodes, "wide shot, moving right.", seed=5), s1)

    class Interrupted(Exception):
        pass

    calls = {"n": 0}

    def interrupt_on_third_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupted()

    monkeypatch.setattr(host, "throw_if_interrupted", interrupt_on_third_step)
    with pytest.raises(Interrupted):
        shot(nodes, micro, prompt(nodes, "wide shot, moving right.", seed=5), s1)
    assert s1.num_shots == 1
    _, again = shot(nodes, micro, prompt(nodes, "wide shot, moving right.", seed=5), s1)
    assert torch.equal(again, reference)


def test_frames_of_a_shot_must_match_the_story(nodes, micro):
    s1, _ = shot(nodes, micro, prompt(nodes))
    with pytest.raises(ValueError, match="frames per shot"):
        shot(nodes, micro, prompt(nodes, frames=micro.geometry.frames_per_shot + 4), s1)


def test_a_state_from_another_model_is_rejected(nodes, micro):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny = nodes["LoadShotStream"]().load("bundled: tiny", "auto", "auto", device="cpu")["result"][0]
    defaults = nodes["NextShotGenerate"].INPUT_TYPES()["required"]
    assert defaults["width"][1]["default"] == tiny.geometry.width  # widget defaults follow the bundled model
    assert defaults["frames_per_shot"][1]["default"] == tiny.geometry.frames_per_shot
    assert tiny.model_id != micro.model_id
    with pytest.raises(ValueError, match="generated by model"):
        shot(nodes, micro, prompt(nodes), tiny.new_story())  # rejected before any work


# --- ShotFromImages ---------------------------------------------------------------------------------

def images(nodes, engine, image, state=None, caption="wide shot, a red circle on a meadow.", geometry=None):
    g = geometry or engine.geometry
    return nodes["ShotFromImages"]().add(engine, image, "a red circle.", caption, g.width, g.height,
                                         g.frames_per_shot, state=state)


def test_an_image_starts_a_story_that_next_shot_continues(nodes, micro):
    g = micro.geometry
    image = torch.rand(1, 2 * g.height, 3 * g.width, 3)  # Load Image's IMAGE: one frame of another size
    state, frames = images(nodes, micro, image, geometry=g.replace(width=g.width + 16))
    assert state.num_shots == 1 and state.shots[0].source == "footage"
    assert frames.shape == (g.frames_per_shot, g.height, g.width + 16, 3)  # fitted to the new story's size
    assert torch.equal(frames, state.shot_frames(0)) and torch.equal(frames[0], frames[-1])  # a still shot
    after, _ = shot(nodes, micro, prompt(nodes, "close-up, moving up.", seed=2), state)
    assert after.num_shots == 2 and after.shots[0] is state.shots[0]


def test_footage_continues_a_story_and_takes_its_size(nodes, micro):
    g = micro.geometry
    s1, _ = shot(nodes, micro, prompt(nodes, seed=1))
    clip = torch.rand(50, g.height, g.width, 3)
    # the node's own size widgets are unused while a state is connected: the story's size wins
    s2, frames = images(nodes, micro, clip, state=s1, geometry=g.replace(width=g.width * 2))
    assert s1.num_shots == 1 and s2.num_shots == 2 and frames.shape == (g.frames_per_shot, g.height, g.width, 3)
    assert [s.source for s in s2.shots] == ["generated", "footage"]


def test_shot_from_images_validation_names_the_problem(nodes, micro):
    cls = nodes["ShotFromImages"]
    assert "caption is empty" in cls.VALIDATE_INPUTS(caption=" ", width=64, height=64, frames_per_shot=33)
    assert "divisible by 16" in cls.VALIDATE_INPUTS(caption="ok", width=72, height=64, frames_per_shot=33)
    assert cls.VALIDATE_INPUTS(caption="ok", width=72, height=64, frames_per_shot=32, state=None) is True
    s1, _ = shot(nodes, micro, prompt(nodes, seed=1))
    with pytest.raises(ValueError, match="RGB, channels last"):
        images(nodes, micro, torch.rand(1, 8, 8, 4), state=s1)
    assert s1.num_shots == 1


# --- CacheState -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_shots(pack, micro):
    nodes = pack.NODE_CLASS_MAPPINGS
    state = None
    for k in range(3):
        state, _ = shot(nodes, micro, prompt(nodes, f"wide shot, shot {k + 1}.", seed=k), state)
    return state


def test_cache_state_actions(nodes, three_shots, out_dir):
    node = nodes["CacheState"]()
    out = node.apply("show", 1, "x", three_shots)
    assert out["result"][0] is three_shots and "3 shots" in out["ui"]["text"][0]
    assert node.apply("reset", 1, "x", three_shots)["result"][0].num_shots == 0
    rolled = node.apply("rollback", 2, "x", three_shots)["result"][0]
    assert rolled.num_shots == 2 and three_shots.num_shots == 3
    forked = node.apply("fork", 0, "x", three_shots)["result"][0]
    assert forked.story_id != three_shots.story_id and forked.num_shots == 3
    with pytest.raises(ValueError, match="0..3"):
        node.apply("rollback", 7, "x", three_shots)
    with pytest.raises(ValueError, match="needs a story state"):
        node.apply("show", 1, "x", None)


def test_cache_state_save_and_load_round_trip(nodes, three_shots, out_dir):
    node = nodes["CacheState"]()
    saved = node.apply("save", 0, "stories/demo", three_shots)
    assert "saved stories/demo_00001" in saved["ui"]["text"]
    assert (out_dir / "stories" / "demo_00001.safetensors").is_file()
    assert "demo_00002" in node.apply("save", 0, "stories/demo", three_shots)["ui"]["text"][1]
    loaded = node.apply("load", 0, "stories/demo_00001", None)["result"][0]
    assert loaded.num_shots == 3 and torch.equal(loaded.frames(), three_shots.frames())
    with pytest.raises(FileNotFoundError, match="demo_00001"):
        node.apply("load", 0, "stories/nope", None)
    # a dot in the name is part of the name, not an extension: counted, saved and loaded as named
    for n in (1, 2):
        assert f"saved v1.2/take.b_0000{n}" in node.apply("save", 0, "v1.2/take.b", three_shots)["ui"]["text"]
    assert (out_dir / "v1.2" / "take.b_00002.safetensors").is_file()
    assert node.apply("load", 0, "v1.2/take.b_00002", None)["result"][0].num_shots == 3
    with pytest.raises(ValueError, match="relative name"):
        node.apply("save", 0, "../outside", three_shots)


# --- VideoCombine ---------------------------------------------------------------------------------

def psnr(video, frames) -> float:
    """dB between a read-back uint8 video [F, H, W, 3] and float frames in 0..1."""
    mse = ((torch.as_tensor(video).float() / 255 - frames.float()) ** 2).mean()
    return float(10 * torch.log10(1 / mse))


def test_video_combine_writes_the_story(nodes, three_shots, out_dir):
    from shotstream_core.video import read_video

    g = three_shots.geometry
    out = nodes["VideoCombine"]().combine(16, "mp4 + webp", "ShotStream/test", state=three_shots)
    frames, path = out["result"]
    assert frames.shape == (3 * g.frames_per_shot, g.height, g.width, 3)
    assert path == str(out_dir / "ShotStream" / "test_00001.mp4")
    assert torch.equal(frames, three_shots.frames())  # the story's frames, in shot order
    video, fps = read_video(path)
    assert video.shape == (3 * g.frames_per_shot, g.height, g.width, 3) and fps == 16
    # the file holds those frames in that order: the micro model's noisy frames code at only ~23 dB, but
    # the same frames one frame or one shot out of step read at least 2 dB worse
    right = psnr(video, frames)
    assert right > 2 + max(psnr(video, frames.roll(1, 0)), psnr(video, frames.roll(g.frames_per_shot, 0)))
    assert (out_dir / "ShotStream" / "test_00001.webp").is_file()
    assert [v["format"] for v in out["ui"]["videos"]] == ["mp4", "webp"]
    assert out["ui"]["images"][0]["filename"] == "test_00001.webp"


def test_video_combine_appends_images_and_checks_inputs(nodes, three_shots, out_dir):
    g = three_shots.geometry
    extra = three_shots.shot_frames(0)
    out = nodes["VideoCombine"]().combine(8, "mp4", "joined", images=extra, state=three_shots)
    joined = out["result"][0]
    assert joined.shape[0] == 4 * g.frames_per_shot  # the story first, then the appended images
    assert torch.equal(joined[:3 * g.frames_per_shot], three_shots.frames()) and torch.equal(joined[-g.frames_per_shot:], extra)
    assert out["ui"]["images"][0]["type"] == "temp"  # a WebP preview for UIs that show only images
    # dotted prefixes keep their counter; the same stem in two folders gets two previews
    one = nodes["VideoCombine"]().combine(8, "mp4", "a/story.final", images=extra)
    two = nodes["VideoCombine"]().combine(8, "mp4", "b/story.final", images=extra)
    assert one["result"][1] == str(out_dir / "a" / "story.final_00001.mp4")
    assert nodes["VideoCombine"]().combine(8, "mp4", "a/story.final", images=extra)["result"][1].endswith("_00002.mp4")
    assert one["ui"]["images"][0]["filename"] != two["ui"]["images"][0]["filename"]
    with pytest.raises(ValueError, match="nothing to write"):
        nodes["VideoCombine"]().combine(8, "mp4", "x")
    with pytest.raises(ValueError, match="differ in size"):
        nodes["VideoCombine"]().combine(8, "mp4", "x", images=torch.zeros(2, g.height + 16, g.width, 3),
                                        state=three_shots)


def test_the_pack_runs_its_own_engine_even_where_another_copy_is_installed(tmp_path):
    """A second checkout of the pack in custom_nodes/, beside an editable install of this one: its nodes must
    import the engine beside them, not the installed one."""
    import shutil
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    copy = tmp_path / "custom_nodes" / "ShotStream"
    for part in ("__init__.py", "nodes", "shotstream_core", "web", "workflows"):
        src = repo / part
        (shutil.copytree(src, copy / part, ignore=shutil.ignore_patterns("weights", "__pycache__"))
         if src.is_dir() else (copy.mkdir(parents=True, exist_ok=True), shutil.copy(src, copy / part)))
    script = f"""
import importlib.util, sys
sys.path.insert(0, {str(repo)!r})  # the other copy, importable first (as an editable install is)
import importlib; assert importlib.util.find_spec("shotstream_core").submodule_search_locations[0] == {str(repo / "shotstream_core")!r}
spec = importlib.util.spec_from_file_location("ShotStream", {str(copy / "__init__.py")!r},
                                              submodule_search_locations=[{str(copy)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["ShotStream"] = pack; spec.loader.exec_module(pack)
import shotstream_core.engine
print(shotstream_core.engine.__file__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(copy / "shotstream_core" / "engine.py")
    # the other copy's package imported first, none of its modules yet: still ours
    first = script.replace("import importlib; assert", "import shotstream_core; import importlib; assert")
    out = subprocess.run([sys.executable, "-W", "error", "-c", first], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(copy / "shotstream_core" / "engine.py"), out.stderr
    # its modules in use already: they stay, and a warning names both folders
    used = script.replace("import importlib; assert", "import shotstream_core.engine; import importlib; assert")
    out = subprocess.run([sys.executable, "-c", used], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == str(repo / "shotstream_core" / "engine.py")
    assert "the engine already imported is" in out.stderr and str(copy / "shotstream_core") in out.stderr
    # the pack reached through a symlink to the folder whose engine is in use: no warning
    link = tmp_path / "linked"
    link.symlink_to(repo, target_is_directory=True)
    same = used.replace(str(copy), str(link))
    out = subprocess.run([sys.executable, "-W", "error", "-c", same], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_requirements_txt_is_the_runtime_dependencies_without_torch():
    """ComfyUI-Manager installs requirements.txt, pip the pyproject: the two lists must not drift apart."""
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (repo / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == [d for d in project if not d.startswith("torch")]
