"""StoryState: the finished shots of a story, immutable from the caller's side.

Generating a shot returns a new state; the old one is untouched, so a failed or interrupted shot loses
nothing, and an edited later prompt can restart from any earlier state. Only what later shots need is
kept: captions, seeds, flags, and the decoded frames (future context selection re-encodes a few of them).
A shot can also be footage given by the user (its `source`): later shots see it exactly as a generated one.
Saved as safetensors (frames) + JSON (everything else); no pickle.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ShotGeometry
from .files import save_tensors

# 2: the geometry records the DiT's patch (dit_patch). Format 1 states, all made under Wan's 2x2 patch,
# still load; a build that knows only format 1 refuses a format 2 state by name instead of failing on
# the new field. 3: each shot records its source (generated or footage); older states are all generated.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
SOURCES = ("generated", "footage")  # footage: frames the user gave, not sampled (its seed means nothing)
SHOT_FIELDS = ("global_caption", "caption", "negative", "seed", "flag", "source")


@dataclass(frozen=True, eq=False)
class ShotRecord:
    global_caption: str
    caption: str
    negative: str
    seed: int
    flag: int
    frames: torch.Tensor = field(repr=False)  # uint8 [F, H, W, 3], CPU
    source: str = "generated"  # one of SOURCES

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"a shot's source is one of {', '.join(SOURCES)}, not {self.source!r}")

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    # By value, frames included (a tensor's own == is elementwise, which the generated methods cannot use).
    def _text_fields(self) -> tuple:
        return tuple(getattr(self, k) for k in SHOT_FIELDS)

    def __eq__(self, other) -> bool:
        if not isinstance(other, ShotRecord):
            return NotImplemented
        return self._text_fields() == other._text_fields() and torch.equal(self.frames, other.frames)

    def __hash__(self) -> int:
        return hash((self._text_fields(), tuple(self.frames.shape)))


@dataclass(frozen=True)
class StoryState:
    model_id: str
    geometry: ShotGeometry
    shots: tuple[ShotRecord, ...] = ()
    story_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def num_shots(self) -> int:
        return len(self.shots)

    def with_shot(self, record: ShotRecord) -> "StoryState":
        frames = record.frames
        expected = (self.geometry.height, self.geometry.width, 3)
        if frames.dtype != torch.uint8 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"shot frames must be uint8 [F, {expected[0]}, {expected[1]}, 3]; got {frames.dtype} {tuple(frames.shape)}")
        return dataclasses.replace(self, shots=self.shots + (record,))

    def truncate(self, k: int) -> "StoryState":
        """The story as it was after its first k shots (rollback)."""
        if not 0 <= k <= self.num_shots:
            raise ValueError(f"cannot roll back to shot {k}: the story has {self.num_shots} shots (use 0..{self.num_shots})")
        return dataclasses.replace(self, shots=self.shots[:k])

    def fork(self) -> "StoryState":
        """An independent branch with the same shots (frames are shared read-only, never written)."""
        return dataclasses.replace(self, story_id=uuid.uuid4().hex[:12])

    def shot_frames(self, i: int) -> torch.Tensor:
        """float [F, H, W, 3] in [0, 1]."""
        return self.shots[i].frames.float() / 255.0

    def frames(self) -> torch.Tensor:
        if not self.shots:
            g = self.geometry
            return torch.zeros(0, g.height, g.width, 3)
        return torch.cat([self.shot_frames(i) for i in range(self.num_shots)])

    def memory_bytes(self) -> int:
        return sum(s.frames.numel() for s in self.shots)

    def summary(self) -> str:
        g = self.geometry
        lines = [f"story {self.story_id}: {self.num_shots} shots, {g.width}x{g.height}, {g.frames_per_shot} frames/shot "
                 f"at {g.fps} fps, {self.memory_bytes() / 2**20:.1f} MiB of frames, model {self.model_id}"]
        for i, s in enumerate(self.shots):
            origin = "footage" if s.source == "footage" else f"seed {s.seed}"
            lines.append(f"  shot {i + 1} (flag {s.flag}, {origin}, {s.num_frames} frames): {s.caption}")
        if self.shots:
            lines.insert(1, f"  global: {self.shots[-1].global_caption}")
        return "\n".join(lines)

    # --- persistence ------------------------------------------------------------------------------

    @staticmethod
    def file_path(path: str | Path) -> Path:
        """PATH.safetensors for PATH (as given when it already ends so); a dot inside the name stays."""
        path = Path(path)
        return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")

    def save(self, path: str | Path) -> Path:
        """Write PATH.safetensors (frames) and PATH.json (captions, seeds, flags, sources, geometry)."""
        path = self.file_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "model_id": self.model_id,
            "story_id": self.story_id,
            "geometry": dataclasses.asdict(self.geometry),
            "shots": [{k: getattr(s, k) for k in SHOT_FIELDS} for s in self.shots],
        }
        tensors = {f"shot{i}.frames": s.frames.contiguous() for i, s in enumerate(self.shots)}
        save_tensors(tensors, path, metadata={"shotstream_state": str(FORMAT_VERSION)})
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "StoryState":
        path = cls.file_path(path)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(f"story state needs both {path.name} and {meta_path.name} in {path.parent}")
        def damaged(what: str) -> ValueError:
            return ValueError(f"{meta_path.name} / {path.name}: {what}; this is not a story state as ShotStream "
                              "saves it (edited or damaged?): save the story again, or load another")

        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise damaged(f"unreadable JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_FORMATS:
            *older, newest = map(str, READABLE_FORMATS)
            raise ValueError(f"{meta_path} is not a ShotStream story state of format {', '.join(older)} or "
                             f"{newest} (a newer pack may read it)")
        missing = [k for k in ("model_id", "story_id", "geometry", "shots") if k not in meta]
        if missing:
            raise damaged(f"no {', '.join(missing)}")
        try:
            geometry = ShotGeometry(**meta["geometry"])
            tensors = load_file(str(path))
        except (TypeError, ValueError, SafetensorError) as e:
            raise damaged(f"{type(e).__name__}: {e}") from None
        if not isinstance(meta["shots"], list) or len(tensors) != len(meta["shots"]):
            raise damaged(f"{len(meta['shots']) if isinstance(meta['shots'], list) else 'no list of'} shots "
                          f"described, {len(tensors)} shots of frames")
        state = cls(meta["model_id"], geometry, (), meta["story_id"])
        expected = (geometry.frames_per_shot, geometry.height, geometry.width, 3)
        for i, fields in enumerate(meta["shots"]):
            frames = tensors.get(f"shot{i}.frames")
            if frames is None or frames.dtype != torch.uint8 or tuple(frames.shape) != expected:
                found = "none" if frames is None else f"{frames.dtype} {tuple(frames.shape)}"
                raise damaged(f"shot {i + 1}'s frames are {found}, not uint8 {expected} as the story's size says")
            try:
                state = state.with_shot(ShotRecord(frames=frames, **fields))
            except (TypeError, ValueError) as e:
                raise damaged(f"shot {i + 1}: {e}") from None
        return state
