"""The shipped workflows: UI and API forms agree, every pack node is used, and the stories are what they claim.

No host needed: node definitions come from the pack's own INPUT_TYPES (the same data /object_info serves;
tests/test_comfy_host.py also checks against a real host's web UI).
"""
import json
from collections import Counter
from pathlib import Path

import pytest

from scripts.comfy_host import ui_to_api

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
NAMES = ["story_3shot_starter", "story_5shot_video", "story_branching", "story_from_image"]
HOST_NODES = {"LoadImage"}  # ComfyUI's own nodes the workflows use


def load(name, api=False):
    return json.loads((WORKFLOWS / f"{name}{'.api' if api else ''}.json").read_text())


@pytest.fixture(scope="module")
def object_info(pack):
    info = {name: {"input": cls.INPUT_TYPES()} for name, cls in pack.NODE_CLASS_MAPPINGS.items()}
    # ComfyUI's Load Image, as a host with the pack's workflow pictures in its input folder defines it
    pictures = sorted(p.name for p in (WORKFLOWS / "inputs").glob("*.png"))
    info["LoadImage"] = {"input": {"required": {"image": (pictures, {"image_upload": True})}}}
    return info


def strip_meta(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def test_each_workflow_ships_in_both_forms():
    ui_files = sorted(p.name for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json"))
    assert ui_files == sorted(f"{n}.json" for n in NAMES)
    for name in NAMES:
        assert (WORKFLOWS / f"{name}.api.json").is_file()


@pytest.mark.parametrize("name", NAMES)
def test_ui_converts_to_the_shipped_api_form(name, object_info):
    assert ui_to_api(load(name), object_info) == strip_meta(load(name, api=True))


def test_conversion_catches_a_changed_widget(object_info):
    # The agreement test above can fail: one edited caption in the UI form no longer matches.
    ui = load("story_3shot_starter")
    prompt_node = next(n for n in ui["nodes"] if n["type"] == "ShotPrompt")
    prompt_node["widgets_values"][1] = "close-up, something else entirely."
    assert ui_to_api(ui, object_info) != strip_meta(load("story_3shot_starter", api=True))


def test_every_pack_node_appears_in_some_workflow(pack):
    used = {node["class_type"] for name in NAMES for node in load(name, api=True).values()}
    assert used == set(pack.NODE_CLASS_MAPPINGS) | HOST_NODES


def test_the_pictures_the_workflows_load_ship_and_are_the_story_worlds(object_info):
    """Every Load Image names a shipped picture, and each picture is what scripts/workflow_inputs.py draws."""
    import numpy as np
    from PIL import Image

    from scripts.workflow_inputs import INPUTS

    loaded = {node["inputs"]["image"] for name in NAMES for node in load(name, api=True).values()
              if node["class_type"] == "LoadImage"}
    assert loaded and loaded <= set(INPUTS)
    for name, draw in INPUTS.items():
        shipped = np.asarray(Image.open(WORKFLOWS / "inputs" / name).convert("RGB"))
        assert np.array_equal(shipped, draw()), f"{name} differs: run python scripts/workflow_inputs.py"


@pytest.mark.parametrize("name", NAMES)
def test_ui_links_are_consistent(name):
    ui = load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert ui["last_node_id"] == max(nodes) and ui["last_link_id"] == max(link[0] for link in ui["links"])
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == type_
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot] == {"name": nodes[dst]["inputs"][dst_slot]["name"], "type": type_,
                                                  "link": link_id}


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_pass_the_nodes_validation(name, pack):
    for node_id, node in load(name, api=True).items():
        if node["class_type"] in HOST_NODES:
            continue  # checked against the host by tests/test_comfy_host.py
        cls = pack.NODE_CLASS_MAPPINGS[node["class_type"]]
        types = {**cls.INPUT_TYPES()["required"], **cls.INPUT_TYPES().get("optional", {})}
        for key, value in node["inputs"].items():
            spec = types[key]
            if isinstance(spec[0], list):
                assert value in spec[0], (node_id, key, value)
        if hasattr(cls, "VALIDATE_INPUTS"):
            import inspect
            args = inspect.signature(cls.VALIDATE_INPUTS).parameters
            widgets = {k: v for k, v in node["inputs"].items() if k in args and not isinstance(v, list)}
            assert cls.VALIDATE_INPUTS(**widgets) is True, (name, node_id)


def shots_chain(api):
    """For each NextShotGenerate: (its id, the NextShotGenerate it continues or None, via which nodes)."""
    def upstream_shot(node_id):
        node = api[node_id]
        if node["class_type"] == "NextShotGenerate":
            return node_id
        state = node["inputs"].get("state")
        return upstream_shot(state[0]) if state else None

    out = {}
    for node_id, node in api.items():
        if node["class_type"] == "NextShotGenerate":
            state = node["inputs"].get("state")
            out[node_id] = upstream_shot(state[0]) if state else None
    return out


def depth(chain, node_id):
    return 1 if chain[node_id] is None else 1 + depth(chain, chain[node_id])


def test_starter_is_one_three_shot_chain_into_a_video():
    api = load("story_3shot_starter", api=True)
    chain = shots_chain(api)
    assert sorted(depth(chain, n) for n in chain) == [1, 2, 3]
    assert Counter(n["class_type"] for n in api.values())["VideoCombine"] == 1


def test_five_shot_story_ends_in_video_combine():
    api = load("story_5shot_video", api=True)
    chain = shots_chain(api)
    assert sorted(depth(chain, n) for n in chain) == [1, 2, 3, 4, 5]
    last = max(chain, key=lambda n: depth(chain, n))
    video = next(n for n in api.values() if n["class_type"] == "VideoCombine")
    # the video's state comes (through any pass-through nodes) from the fifth shot
    src = video["inputs"]["state"][0]
    while api[src]["class_type"] != "NextShotGenerate":
        src = api[src]["inputs"]["state"][0]
    assert src == last


def test_branching_story_has_two_third_shots_from_one_state():
    api = load("story_branching", api=True)
    chain = shots_chain(api)
    thirds = [n for n in chain if depth(chain, n) == 3]
    assert len(thirds) == 2 and chain[thirds[0]] == chain[thirds[1]]
    captions = {api[api[n]["inputs"]["prompt"][0]]["inputs"]["caption"] for n in thirds}
    assert len(captions) == 2  # two different alternatives
    assert Counter(n["class_type"] for n in api.values())["VideoCombine"] == 2


def test_the_workflows_tell_one_story():
    # Same node ids and inputs for the model and shots 1-3 in all three: a host that ran one reuses those
    # shots from its cache for the others (the host tests rely on it to stay fast).
    starter = load("story_3shot_starter", api=True)
    shared = [k for k, v in starter.items() if v["class_type"] != "VideoCombine"]
    for name in ("story_5shot_video", "story_branching"):
        other = load(name, api=True)
        for k in shared:
            assert (other[k]["class_type"], other[k]["inputs"]) == (starter[k]["class_type"], starter[k]["inputs"])


def test_story_from_image_opens_with_the_picture_and_goes_on_as_the_starter_does():
    api = load("story_from_image", api=True)
    starter = load("story_3shot_starter", api=True)
    (opening,) = [n for n in api.values() if n["class_type"] == "ShotFromImages"]
    assert "state" not in opening["inputs"] and api[opening["inputs"]["images"][0]]["class_type"] == "LoadImage"
    chain = shots_chain(api)  # generated shots only: the picture starts the story
    assert sorted(depth(chain, n) for n in chain) == [1, 2]
    first = next(n for n in chain if depth(chain, n) == 1)
    assert api[first]["inputs"]["state"] == [next(k for k, v in api.items() if v is opening), 0]

    def prompts(workflow, shots):
        return [{k: workflow[workflow[n]["inputs"]["prompt"][0]]["inputs"][k] for k in ("global_caption", "caption", "seed")}
                for n in shots]

    ours = sorted(chain, key=lambda n: depth(chain, n))
    starter_chain = shots_chain(starter)
    theirs = sorted(starter_chain, key=lambda n: depth(starter_chain, n))
    # the picture is the starter's first shot, by its captions; shots 2 and 3 are the starter's own prompts
    (shot1,) = prompts(starter, theirs[:1])
    assert (opening["inputs"]["global_caption"], opening["inputs"]["caption"]) == (shot1["global_caption"], shot1["caption"])
    assert prompts(api, ours) == prompts(starter, theirs[1:])
    video = next(n for n in api.values() if n["class_type"] == "VideoCombine")
    assert video["inputs"]["state"][0] == ours[-1]
