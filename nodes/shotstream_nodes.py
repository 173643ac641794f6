"""The six ShotStream nodes (classic V1 API: loads in old and new ComfyUI hosts).

    LoadShotStream --model--> NextShotGenerate --state--> NextShotGenerate --state--> ... --> VideoCombine
    ShotPrompt ----prompt---^                                                       CacheState (show/save/...)
    ShotFromImages: the user's own frames as a shot (a story can start from an image or go on from footage)

Nodes are thin: all logic is in shotstream_core. Story states are immutable (every node returns a new one),
which is what makes the host's output cache safe: editing shot 3 re-runs shot 3 and later from the cached,
untouched state of shot 2.
"""
from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from shotstream_core.attention import BACKENDS
from shotstream_core.config import get_preset, validate_frames, validate_size
from shotstream_core.engine import ShotRequest
from shotstream_core.loading import DTYPES, load_engine
from shotstream_core.state import StoryState
from shotstream_core.video import VideoWriter

from . import comfy_adapter as host

CATEGORY = "ShotStream"
MODEL = "SHOTSTREAM_MODEL"
PROMPT = "SHOTSTREAM_PROMPT"
STATE = "SHOTSTREAM_STATE"

BUNDLED_PRESET = "tiny"
BUNDLED = f"bundled: {BUNDLED_PRESET}"  # the embedded model; needs no file
AUTO = "auto"  # VAE / text encoder that the preset or checkpoint implies
NONE = "none"  # no LoRA
DEFAULT_GEOMETRY = get_preset(BUNDLED_PRESET).geometry  # widget defaults: what the bundled model was trained at
DEVICES = ("auto", "cpu", "cuda")
TEXT_DEVICES = ("cpu", "model device")


def _validation_message(check, *args) -> bool | str:
    """VALIDATE_INPUTS helper: True, or the check's ValueError text (the host shows it as a node error)."""
    try:
        check(*args)
    except ValueError as e:
        return str(e)
    return True


# An optional input's default in VALIDATE_INPUTS: hosts pass a connected input (as None), never an unconnected one.
_NOT_CONNECTED = object()


class NodeNotes:
    """Collects the engine's warnings while a node runs (a caption cut to the model's text length, a teacher
    loaded as the streaming model): shown on the node by the web extension, and in the host's log, where
    Python's default filter would print each only once a process."""

    def __enter__(self) -> "NodeNotes":
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc) -> None:
        self._catcher.__exit__(*exc)
        self.lines = list(dict.fromkeys(str(w.message) for w in self._caught if issubclass(w.category, UserWarning)))
        for line in self.lines:
            print(f"[ShotStream] note: {line}", file=sys.stderr, flush=True)


def _is_widget_value(v) -> bool:
    # Linked inputs reach VALIDATE_INPUTS as None (their value is only known at run time).
    return v is not None


# --- LoadShotStream ----------------------------------------------------------------------------------

class LoadShotStream:
    DESCRIPTION = ("Loads a ShotStream model: the causal DiT, its VAE and its text encoder. 'bundled: tiny' is "
                   "the small model shipped with the pack (64x64, 33 frames a shot); other checkpoints are "
                   "looked up in models/shotstream, models/diffusion_models (unet), models/vae and "
                   "models/text_encoders (clip). Two story chains can share one loaded model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"

    FILE_INPUTS = {  # input name -> (model kind, what it is, the "no file" choice)
        "dit_name": ("dit", "DiT checkpoint", BUNDLED),
        "vae_name": ("vae", "VAE", AUTO),
        "text_encoder_name": ("text_encoder", "text encoder", AUTO),
        "lora_name": ("lora", "LoRA", NONE),
    }

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dit_name": ([BUNDLED] + host.list_models("dit"), {
                "tooltip": "Diffusion transformer weights (.safetensors/.pt). 'bundled: tiny' needs no download; "
                           "others come from models/shotstream or models/diffusion_models."}),
            "vae_name": ([AUTO] + host.list_models("vae"), {
                "tooltip": "Wan2.1 VAE weights. 'auto' uses the VAE that belongs to the chosen model "
                           "(the bundled one for the tiny model)."}),
            "text_encoder_name": ([AUTO] + host.list_models("text_encoder"), {
                "tooltip": "Text encoder weights (umT5-XXL for Wan models). 'auto' uses the encoder that belongs "
                           "to the chosen model (MiniLM for the tiny model)."}),
            "precision": (list(DTYPES), {
                "default": "fp32", "tooltip": "Weight and compute precision. bf16 halves memory on GPUs; use fp32 on CPU."}),
            "attention": (list(BACKENDS), {
                "default": "auto",
                "tooltip": "Attention kernel. 'auto' picks flash-attn 3/2 on CUDA when installed, else PyTorch SDPA."}),
            "device": (list(DEVICES), {
                "default": "auto", "tooltip": "Where the DiT and VAE run. 'auto' = CUDA if available, else CPU."}),
            "text_encoder_device": (list(TEXT_DEVICES), {
                "default": "cpu",
                "tooltip": "Keep the text encoder on the CPU (saves GPU memory; prompts are encoded once and cached) "
                           "or put it on the model's device."}),
        }, "optional": {
            "lora_name": ([NONE] + host.list_models("lora"), {
                "tooltip": "A LoRA for the DiT (PEFT, kohya or ComfyUI keys) from models/loras, merged into the "
                           "weights at load; 'none' loads the DiT as it is."}),
            "lora_strength": ("FLOAT", {
                "default": 1.0, "min": -4.0, "max": 4.0, "step": 0.05,
                "tooltip": "How strongly the LoRA is merged (1 = as trained; ignored without a LoRA)."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, dit_name, vae_name, text_encoder_name, lora_name=NONE):
        for name, value in (("dit_name", dit_name), ("vae_name", vae_name), ("text_encoder_name", text_encoder_name),
                            ("lora_name", lora_name)):
            if _is_widget_value(value):
                try:
                    cls._resolve(name, value)
                except FileNotFoundError as e:
                    return str(e)
        return True

    @classmethod
    def _resolve(cls, input_name: str, value: str) -> str | None:
        """The file's full path, None for the built-in choice; FileNotFoundError naming the file otherwise."""
        kind, what, builtin = cls.FILE_INPUTS[input_name]
        if value == builtin:
            return None
        path = host.model_path(kind, value)
        if path is None:
            searched = ", ".join(host.model_search_dirs(kind)) or "(no model folders registered)"
            raise FileNotFoundError(
                f"{what} file '{value}' was not found (searched: {searched}). Put the file in one of those "
                f"folders and refresh, or choose '{builtin}'.")
        return path

    def load(self, dit_name, vae_name, text_encoder_name, precision="fp32", attention="auto", device="auto",
             text_encoder_device="cpu", lora_name=NONE, lora_strength=1.0):
        # A checkpoint's preset (geometry, VAE, text encoder) is inferred from its shapes by load_engine.
        with NodeNotes() as notes:
            engine = load_engine(
                dit_path=self._resolve("dit_name", dit_name),
                vae_path=self._resolve("vae_name", vae_name),
                text_encoder_path=self._resolve("text_encoder_name", text_encoder_name),
                preset=BUNDLED_PRESET,
                dtype=precision, device=device, attention=attention,
                text_encoder_device="cpu" if text_encoder_device == "cpu" else device,
                lora_path=self._resolve("lora_name", lora_name), lora_strength=float(lora_strength),
            )
        return {"ui": {"text": notes.lines}, "result": (engine,)}


# --- ShotPrompt --------------------------------------------------------------------------------------

GLOBAL_CAPTION_INPUT = ("STRING", {  # Shot Prompt's and Shot From Images'
    "multiline": True, "default": "",
    "tooltip": "Describes the characters and the world; keep it identical across the shots of a story."})

@dataclass(frozen=True)
class ShotPromptSpec:
    """What flows on a SHOTSTREAM_PROMPT link: the engine's request plus per-shot settings."""

    request: ShotRequest
    frames: int = 0  # 0 = the story's frames per shot


class ShotPrompt:
    DESCRIPTION = ("The text of one shot: a global caption (who and where, the same for the whole story), this "
                   "shot's caption (what happens now), and the shot's seed. Feed it to Next Shot. (No negative "
                   "prompt: the few-step student samples without guidance, so one would change nothing.)")
    CATEGORY = CATEGORY
    RETURN_TYPES = (PROMPT,)
    RETURN_NAMES = ("prompt",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "global_caption": GLOBAL_CAPTION_INPUT,
                "caption": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What happens in this shot. Must not be empty."}),
            },
            "optional": {
                "seed": ("INT", {
                    "default": 0, "min": 0, "max": 2**63 - 1, "control_after_generate": True,
                    "tooltip": "Noise seed of this shot: the same seeds and prompts give the same frames."}),
                "frames": ("INT", {
                    "default": 0, "min": 0, "max": 1025, "step": 1,
                    "tooltip": "Frames of this shot (4k+1). 0 = the story's frames per shot; a shot of a running "
                               "story must match the story's length."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, caption=None, frames=None):
        if _is_widget_value(caption) and not str(caption).strip():
            return "the shot caption is empty: describe what happens in this shot"
        if _is_widget_value(frames) and frames:
            return _validation_message(validate_frames, int(frames))
        return True

    def build(self, global_caption, caption, seed=0, frames=0):
        if frames:
            validate_frames(int(frames))
        return (ShotPromptSpec(ShotRequest(global_caption, caption, seed=int(seed)), int(frames)),)


# --- NextShotGenerate --------------------------------------------------------------------------------

def _preview_strip(frames: torch.Tensor, count: int = 4):
    """PIL image of up to `count` evenly spaced frames of a block, side by side. frames: [n, H, W, 3] in 0..1."""
    from PIL import Image

    idx = torch.linspace(0, frames.shape[0] - 1, min(count, frames.shape[0])).round().long()
    strip = torch.cat(list(frames[idx]), dim=1)  # [H, k*W, 3]
    return Image.fromarray((strip * 255).round().to(torch.uint8).numpy())


def _new_story_inputs(continues_what: str) -> dict:
    """Size and length widgets of a node that starts a story when no state is connected."""
    g = DEFAULT_GEOMETRY
    unused = f"Greyed out, and unused, while a state is connected ({continues_what})."
    return {
        "width": ("INT", {"default": g.width, "min": 16, "max": 4096, "step": 16,
                          "tooltip": f"Frame width of a new story (multiple of 16). {unused}"}),
        "height": ("INT", {"default": g.height, "min": 16, "max": 4096, "step": 16,
                           "tooltip": f"Frame height of a new story (multiple of 16). {unused}"}),
        "frames_per_shot": ("INT", {"default": g.frames_per_shot, "min": 1, "max": 1025, "step": 1,
                                    "tooltip": f"Frames per shot of a new story (4k+1). {unused}"}),
    }


def _validate_new_story(width, height, frames_per_shot, state) -> bool | str:
    if state is not _NOT_CONNECTED:  # it continues a story, whose own size wins: these widgets go unused
        return True  # (and the editor greys them out, so an error on one could not be fixed in place)
    if _is_widget_value(width) and _is_widget_value(height):
        # The model is unknown here: Wan's 2x2 patch (the widgets' step of 16; the bundled model's too).
        # The node checks the size again through the model's own geometry when it runs.
        msg = _validation_message(validate_size, int(height), int(width))
        if msg is not True:
            return msg
    if _is_widget_value(frames_per_shot):
        return _validation_message(validate_frames, int(frames_per_shot))
    return True


def _story(model, state, width: int, height: int, frames_per_shot: int):
    """`state`, or a new story of this size and length on `model` when none is connected."""
    if state is not None:
        return state
    geometry = model.geometry.replace(height=int(height), width=int(width), frames_per_shot=int(frames_per_shot))
    return model.new_story(geometry)


class NextShotGenerate:
    DESCRIPTION = ("Generates the next shot of a story, conditioned on the earlier shots in the story state. "
                   "Without a state input it starts a new story of the given size and length. Each block's "
                   "frames appear as the node's preview while the shot is generated. Returns a new state "
                   "(the input state is never changed) and this shot's frames.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (STATE, "IMAGE")
    RETURN_NAMES = ("state", "frames")
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model from Load ShotStream."}),
                "prompt": (PROMPT, {"tooltip": "This shot's captions and seed, from Shot Prompt."}),
                **_new_story_inputs("the story's own size wins"),
            },
            "optional": {
                "state": (STATE, {"tooltip": "The story so far. Leave unconnected to start a new story."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width=None, height=None, frames_per_shot=None, state=_NOT_CONNECTED):
        return _validate_new_story(width, height, frames_per_shot, state)

    def generate(self, model, prompt, width, height, frames_per_shot, state=None):
        if not isinstance(prompt, ShotPromptSpec):
            raise TypeError(f"prompt must come from a Shot Prompt node, got {type(prompt).__name__}")
        if state is None:
            state = _story(model, None, width, height, prompt.frames or frames_per_shot)
        elif prompt.frames and prompt.frames != state.geometry.frames_per_shot:
            raise ValueError(
                f"this shot asks for {prompt.frames} frames but the story has {state.geometry.frames_per_shot} "
                f"frames per shot: set the Shot Prompt's frames to 0 or {state.geometry.frames_per_shot}, "
                "or start a new story")

        progress = None

        def on_step(done: int, total: int):
            nonlocal progress
            host.throw_if_interrupted()
            if progress is None:
                progress = host.Progress(total)
            progress.update(done)

        with NodeNotes() as notes:  # e.g. a caption cut to the model's text length
            stream = model.stream_shot(state, prompt.request, on_step=on_step)  # checks model / state match
            for block in stream:
                if progress is not None:  # stream this block's pixels as the node's preview
                    progress.update(progress.value, preview=_preview_strip(block.frames))
        self.last_progress = progress  # for tests: how many previews this shot sent
        return {"ui": {"text": notes.lines}, "result": (stream.state, stream.frames)}


# --- ShotFromImages ----------------------------------------------------------------------------------

class ShotFromImages:
    DESCRIPTION = ("Your own frames as the next shot of a story: one image (a story that starts from a picture) "
                   "or a clip's frames (footage to go on from). They are fitted to the story's size (centre crop, "
                   "then resize) and frames per shot (evenly spaced frames; one image becomes a still shot). Nothing "
                   "is generated: later shots see these frames as they would a generated shot, and read this "
                   "caption for them, so say what the images show. Without a state input it starts a new story "
                   "of the given size and length. Returns the new state and the fitted frames.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (STATE, "IMAGE")
    RETURN_NAMES = ("state", "frames")
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model from Load ShotStream (it encodes these frames for later shots)."}),
                "images": ("IMAGE", {"tooltip": "One image, or a batch of frames (a clip), from Load Image or a video loader."}),
                "global_caption": GLOBAL_CAPTION_INPUT,
                "caption": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "What these images show, as a shot caption. Must not be empty."}),
                **_new_story_inputs("the images are fitted to the story's size"),
            },
            "optional": {
                "state": (STATE, {"tooltip": "The story so far. Leave unconnected to start a new story with these images."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, caption=None, width=None, height=None, frames_per_shot=None, state=_NOT_CONNECTED):
        if _is_widget_value(caption) and not str(caption).strip():
            return "the shot caption is empty: describe what the images show"
        return _validate_new_story(width, height, frames_per_shot, state)

    def add(self, model, images, global_caption, caption, width, height, frames_per_shot, state=None):
        story = _story(model, state, width, height, frames_per_shot)
        new_state = model.add_footage(story, images, global_caption, caption)
        return (new_state, new_state.shot_frames(new_state.num_shots - 1))


# --- files under the output folder -------------------------------------------------------------------

def _output_relative(name: str, what: str) -> Path:
    """A user-given name as a path inside the output folder; rejects absolute paths and '..' escapes."""
    rel = Path(str(name).strip().replace("\\", "/"))
    if not str(rel) or str(rel) == "." or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{what} {name!r} must be a relative name inside the output folder, "
                         "e.g. 'shotstream/story' (no absolute paths, no '..')")
    return rel


def next_output_base(prefix: str, what: str = "filename prefix") -> tuple[Path, str, str]:
    """(full path without extension, file stem, subfolder) of the next free PREFIX_NNNNN in the output folder."""
    rel = _output_relative(prefix, what)
    folder = host.output_directory() / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(rel.name) + r"_(\d{5})\.")
    taken = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    stem = f"{rel.name}_{max(taken, default=0) + 1:05d}"
    subfolder = "" if str(rel.parent) == "." else rel.parent.as_posix()
    return folder / stem, stem, subfolder


# --- CacheState --------------------------------------------------------------------------------------

class CacheState:
    DESCRIPTION = ("Shows a story state (shots, captions, seeds, memory) and acts on it: reset (empty story, "
                   "same size), rollback (keep the first k shots), fork (an independent branch), save (to "
                   "<output>/<filename>_NNNNN.safetensors + .json) or load (a saved state, no input needed). "
                   "The incoming state is never changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (STATE,)
    RETURN_NAMES = ("state",)
    FUNCTION = "apply"
    OUTPUT_NODE = True
    ACTIONS = ("show", "reset", "rollback", "fork", "save", "load")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "action": (list(cls.ACTIONS), {
                    "default": "show",
                    "tooltip": "show: pass through and display. reset: no shots. rollback: keep shots 1..k. "
                               "fork: independent copy. save: write to the output folder. load: read a saved state."}),
                "shot": ("INT", {
                    "default": 1, "min": 0, "max": 10000,
                    "tooltip": "rollback only: how many shots to keep (0 = none)."}),
                "filename": ("STRING", {
                    "default": "shotstream/story",
                    "tooltip": "save: prefix under the output folder (a number is appended). load: the saved "
                               "file's name under the output folder, e.g. shotstream/story_00001."}),
            },
            "optional": {
                "state": (STATE, {"tooltip": "The story state to show or act on (not needed for load)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, action, filename, **_):
        # A load re-runs when the file changes on disk; other actions depend on their inputs only.
        if action == "load":
            try:
                return cls._load_path(filename).stat().st_mtime
            except (OSError, ValueError):
                return float("nan")  # never equal: try again next time (and report the error then)
        return ""

    @staticmethod
    def _load_path(filename: str) -> Path:
        rel = _output_relative(filename, "state file")
        return StoryState.file_path(host.output_directory() / rel)

    def apply(self, action, shot, filename, state=None):
        lines = []
        if action == "load":
            path = self._load_path(filename)
            if not path.is_file():
                near = sorted(p.relative_to(host.output_directory()).with_suffix("").as_posix()
                              for p in path.parent.glob("*.safetensors")) if path.parent.is_dir() else []
                raise FileNotFoundError(
                    f"no saved story state {path.name} in {path.parent}; "
                    + (f"saved states there: {', '.join(near)}" if near else "save one with action 'save' first"))
            state = StoryState.load(path)
            lines.append(f"loaded {path.relative_to(host.output_directory()).as_posix()}")
        elif state is None:
            raise ValueError(f"action '{action}' needs a story state: connect the state input (only 'load' works without one)")
        elif not isinstance(state, StoryState):
            raise TypeError(f"state must come from a ShotStream node, got {type(state).__name__}")
        elif action == "reset":
            state = state.truncate(0)
        elif action == "rollback":
            state = state.truncate(int(shot))  # ValueError names the valid range
        elif action == "fork":
            state = state.fork()
        elif action == "save":
            base, stem, subfolder = next_output_base(filename, "state filename")
            state.save(base)
            lines.append(f"saved {(Path(subfolder) / stem).as_posix()}")
        elif action != "show":
            raise ValueError(f"unknown action {action!r}; choose one of {', '.join(self.ACTIONS)}")
        return {"ui": {"text": [state.summary(), *lines]}, "result": (state,)}


# --- VideoCombine ------------------------------------------------------------------------------------

class VideoCombine:
    DESCRIPTION = ("Joins shots into a video in the output folder: a whole story state (all its shots in order) "
                   "and/or an IMAGE batch (appended after the state's frames). Writes mp4, animated WebP or "
                   "both, shows the result, and returns the frames and the file path for other video nodes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("frames", "path")
    FUNCTION = "combine"
    OUTPUT_NODE = True
    FORMATS = ("mp4", "webp", "mp4 + webp")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "fps": ("INT", {
                    "default": DEFAULT_GEOMETRY.fps, "min": 1, "max": 120,
                    "tooltip": "Frames per second of the written video."}),
                "format": (list(cls.FORMATS), {
                    "default": "mp4", "tooltip": "mp4 (H.264), animated WebP, or both."}),
                "filename_prefix": ("STRING", {
                    "default": "ShotStream/story",
                    "tooltip": "Name under the output folder; a 5-digit counter is appended."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Frames to write (e.g. one shot's frames); after the state's, if both."}),
                "state": (STATE, {"tooltip": "A story state: all its shots are written in order."}),
            },
        }

    def combine(self, fps, format, filename_prefix, images=None, state=None):
        parts = []
        if state is not None:
            if not isinstance(state, StoryState):
                raise TypeError(f"state must come from a ShotStream node, got {type(state).__name__}")
            parts.append(state.frames())
        if images is not None:
            parts.append(images.float().cpu())
        parts = [p for p in parts if p.shape[0]]
        if not parts:
            raise ValueError("nothing to write: connect a story state with at least one shot, or an IMAGE batch")
        sizes = {tuple(p.shape[1:3]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"the state's frames and the images differ in size {sorted(sizes)}: "
                             "connect only one, or resize the images to the story's size")
        frames = torch.cat(parts)  # [N, H, W, 3] in 0..1

        base, stem, subfolder = next_output_base(filename_prefix)
        exts = {"mp4": ["mp4"], "webp": ["webp"], "mp4 + webp": ["mp4", "webp"]}[format]
        written = {}
        for ext in exts:
            written[ext] = self._write(base.with_name(f"{stem}.{ext}"), frames, fps)
        ui = {"videos": [{"filename": f"{stem}.{e}", "subfolder": subfolder, "type": "output", "format": e,
                          "frame_rate": fps, "frame_count": frames.shape[0]} for e in exts],
              "animated": [True]}
        if "webp" in written:
            ui["images"] = [{"filename": f"{stem}.webp", "subfolder": subfolder, "type": "output"}]
        else:  # old web UIs show images only: add an animated WebP preview in the temp folder
            temp = host.temp_directory()
            temp.mkdir(parents=True, exist_ok=True)
            # named after subfolder and stem: two prefixes that share a stem must not share a preview
            preview = "_".join([*Path(subfolder).parts, f"{stem}_preview.webp"])
            self._write(temp / preview, frames, fps)
            ui["images"] = [{"filename": preview, "subfolder": "", "type": "temp"}]
        return {"ui": ui, "result": (frames, str(written[exts[0]]))}

    @staticmethod
    def _write(path: Path, frames: torch.Tensor, fps: int) -> Path:
        with VideoWriter(path, fps) as writer:
            writer.write(frames)
        return path


NODE_CLASS_MAPPINGS = {
    "LoadShotStream": LoadShotStream,
    "ShotPrompt": ShotPrompt,
    "NextShotGenerate": NextShotGenerate,
    "ShotFromImages": ShotFromImages,
    "CacheState": CacheState,
    "VideoCombine": VideoCombine,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LoadShotStream": "Load ShotStream Model",
    "ShotPrompt": "Shot Prompt",
    "NextShotGenerate": "Next Shot (ShotStream)",
    "ShotFromImages": "Shot From Images (ShotStream)",
    "CacheState": "Story State (show / rollback / fork / save / load)",
    "VideoCombine": "Video Combine (ShotStream)",
}
