"""On-disk stories in the reference's data format, and the general clip reader training uses.

Layout of a story folder (the reference's demo/data/sample.csv + sample/0001.json + sample/0001.mp4):
    DIR/index.csv          shot_num_from_caption,json_path,video_path,frame_number
                           frame_number = "[[start, end), ...]" per shot, absolute frame indices
    DIR/0001.json          {"video_path", "global_caption", "shot1", ..., "shotN"}  (1-based keys)
    DIR/0001.mp4           H.264, the shots back to back (gaps allowed in general data)
    DIR/0001.truth.json    ours, for the analyser: the Story, the geometry and the ranges
Paths in the CSV are relative to the CSV's folder (absolute paths work too).

`read_story_clip` is deliberately general (any size, fps, number of shots, gaps between shots): per-frame
shot flags come from the ABSOLUTE ranges, so a frame in a gap belongs to no shot (flag -1). The
reference built flags from range lengths, which shifts every flag after a gap.
"""
from __future__ import annotations

import ast
import csv
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from shotstream_core.config import ShotGeometry
from shotstream_core.video import X264_REPRODUCIBLE

from .render import default_geometry, render_story
from .world import Story

CSV_NAME = "index.csv"
CSV_FIELDS = ("shot_num_from_caption", "json_path", "video_path", "frame_number")
NO_SHOT = -1  # shot flag of frames that lie in no shot's range


# --- mp4 -------------------------------------------------------------------------------------------

def write_mp4(path, frames: np.ndarray, fps: float, crf: int = 12) -> None:
    """frames: [N, H, W, 3] uint8 -> H.264 yuv420p mp4 (H and W must be even)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"write_mp4 wants uint8 [N, H, W, 3], got {frames.dtype} {frames.shape}")
    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 yuv420p needs even sizes, got {h}x{w}; crop or pad by one pixel")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        # one thread: tiny frames gain nothing from more
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "x264-params": X264_REPRODUCIBLE}
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def read_mp4(path, size: tuple[int, int] | None = None, max_frames: int | None = None
             ) -> tuple[np.ndarray, float]:
    """Decode with PyAV -> (frames [N, H, W, 3] uint8, fps). size=(H, W) resizes while decoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video at {path}")
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.base_rate or 0) or 0.0
        for frame in container.decode(stream):
            if size is None:
                out.append(frame.to_ndarray(format="rgb24"))
            else:
                out.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1]))
            if max_frames is not None and len(out) >= max_frames:
                break
    if not out:
        raise ValueError(f"{path} holds no decodable video frames")
    return np.stack(out), fps


# --- shot ranges and flags -------------------------------------------------------------------------

def validate_ranges(ranges, num_frames: int | None = None, where: str = "") -> list[tuple[int, int]]:
    """Check per-shot [start, end) ranges: integers, start < end, sorted, non-overlapping, in the video."""
    try:
        out = [(int(a), int(b)) for a, b in ranges]
        whole = all(float(v) == int(v) for pair in ranges for v in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{where}shot ranges must be a list of [start, end) pairs, got {ranges!r}") from None
    if not whole:
        raise ValueError(f"{where}shot ranges must be whole frame numbers, got {ranges!r}; give frame indices, "
                         f"not times")
    if not out:
        raise ValueError(f"{where}no shot ranges")
    prev_end = 0
    for k, (a, b) in enumerate(out):
        if a < prev_end or b <= a:
            raise ValueError(
                f"{where}shot {k + 1} range [{a}, {b}) must be non-empty, sorted and must not overlap the "
                f"previous shot (which ends at {prev_end}); fix the CSV's frame_number column")
        prev_end = b
    if num_frames is not None and prev_end > num_frames:
        raise ValueError(f"{where}the last shot ends at frame {prev_end} but the video has only "
                         f"{num_frames} frames; fix frame_number or re-export the video")
    return out


def shot_flags(ranges, num_frames: int) -> np.ndarray:
    """[num_frames] int64: 0-based index of the shot each frame belongs to, NO_SHOT (-1) in gaps."""
    flags = np.full(num_frames, NO_SHOT, np.int64)
    for k, (a, b) in enumerate(ranges):
        flags[a:min(b, num_frames)] = k
    return flags


# --- writing ---------------------------------------------------------------------------------------

def write_story(story: Story, out_dir, name: str, geometry: ShotGeometry | None = None, *,
                gap: int = 0, crf: int = 12) -> dict:
    """Render, encode and save one story; returns its CSV row (paths relative to out_dir)."""
    geometry = geometry or default_geometry()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, ranges = render_story(story, geometry, gap=gap)
    write_mp4(out_dir / f"{name}.mp4", frames, geometry.fps, crf=crf)
    captions = {"video_path": f"{name}.mp4", **story.captions_json()}
    (out_dir / f"{name}.json").write_text(json.dumps(captions, indent=2))
    truth = {"name": name, "geometry": _geometry_dict(geometry), "ranges": ranges, "story": story.to_dict()}
    (out_dir / f"{name}.truth.json").write_text(json.dumps(truth))
    return {"shot_num_from_caption": story.num_shots, "json_path": f"{name}.json",
            "video_path": f"{name}.mp4", "frame_number": json.dumps(ranges)}


def write_index(out_dir, rows: list[dict]) -> Path:
    path = Path(out_dir) / CSV_NAME
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_stories(stories, out_dir, geometry: ShotGeometry | None = None, *, progress: bool = False) -> Path:
    """Write every story as 0001, 0002, ... plus index.csv; returns the CSV path."""
    stories = list(stories)
    width = max(4, len(str(len(stories))))
    it = enumerate(stories)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, total=len(stories), desc="stories")
    rows = [write_story(s, out_dir, f"{i + 1:0{width}d}", geometry) for i, s in it]
    return write_index(out_dir, rows)


def _geometry_dict(g: ShotGeometry) -> dict:
    return {"height": g.height, "width": g.width, "frames_per_shot": g.frames_per_shot, "fps": g.fps}


# --- reading ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClipRecord:
    """One CSV row: where a clip's captions and video are, and its shot ranges."""

    json_path: Path
    video_path: Path | None
    ranges: list[tuple[int, int]]
    where: str = ""  # "DIR/index.csv row N", for errors

    @property
    def name(self) -> str:
        return self.json_path.stem

    def read(self, **kw) -> "StoryClip":
        if self.video_path is None:
            raise ValueError(f"{self.where or self.json_path}: no video_path; training needs the video of "
                             f"every row")
        return read_story_clip(self.video_path, self.json_path, self.ranges, where=self.where, **kw)


@dataclass
class StoryClip:
    frames: np.ndarray  # [N, H, W, 3] uint8: frames 0 .. (end of the last shot)
    ranges: list[tuple[int, int]]  # per shot [start, end), absolute frame indices
    global_caption: str
    shot_captions: list[str]  # caption of shot k (0-based) = JSON key shot{k+1}
    shot_flags: np.ndarray  # [N] int64: shot index of each frame, -1 in gaps
    fps: float
    source: str = ""  # where it was read from ("DIR/index.csv row N (DIR/0001.json)"), for errors

    @property
    def num_shots(self) -> int:
        return len(self.ranges)

    def shot(self, k: int) -> np.ndarray:
        a, b = self.ranges[k]
        return self.frames[a:b]


def _resolve(base: Path, p: str) -> Path:
    q = Path(p)
    if q.is_absolute():
        return q
    return base / q if (base / q).exists() or not q.exists() else q  # CSV-relative, else cwd-relative


def read_index(csv_path) -> list[ClipRecord]:
    """Rows of a reference-format CSV (video_path may be absent, as in the reference's test sets)."""
    csv_path = Path(csv_path)
    if csv_path.is_dir():
        csv_path = csv_path / CSV_NAME
    if not csv_path.is_file():
        raise FileNotFoundError(f"no story index at {csv_path} (expected a CSV with columns {CSV_FIELDS})")
    base = csv_path.parent
    records = []
    needs = (f"a header row {','.join(CSV_FIELDS)} and one row per story, e.g. "
             f'1,0001.json,0001.mp4,"[[0, 49], [49, 98]]" (video_path may be left out for captions alone)')
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{csv_path} is empty: it needs {needs}")
        missing = {"json_path", "frame_number"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} lacks column(s) {sorted(missing)}; expected {CSV_FIELDS}")
        for i, row in enumerate(reader):
            where = f"{csv_path} row {i + 2}: "
            if not (row.get("json_path") or "").strip():
                raise ValueError(f"{where}json_path is empty; every row needs its caption JSON")
            try:
                ranges = ast.literal_eval(row["frame_number"] or "")
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}frame_number {row['frame_number']!r} is not a list of pairs") from None
            video = row.get("video_path")
            records.append(ClipRecord(_resolve(base, row["json_path"]),
                                      _resolve(base, video) if video else None,
                                      validate_ranges(ranges, where=where), where=f"{csv_path} row {i + 2}"))
    if not records:
        raise ValueError(f"{csv_path} has a header but no stories: it needs {needs}")
    return records


def check_unique_names(records) -> None:
    """Refuse two stories named alike: a story is named by its caption file, and pre-encoded latents and
    prompts are keyed by that name, so one would silently stand for the other."""
    first_row = {}
    for r in records:
        if r.name in first_row:
            raise ValueError(f"{first_row[r.name].where} and {r.where} both name their story {r.name!r}, after "
                             f"their caption files {first_row[r.name].json_path} and {r.json_path}: give each "
                             f"story's caption JSON a file name of its own (e.g. the story's folder name)")
        first_row[r.name] = r


def read_captions(json_path, num_shots: int) -> tuple[str, list[str]]:
    """global_caption and shot1..shotN of a caption JSON; every problem is a ValueError naming the file."""
    try:
        with open(json_path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path}: not valid JSON ({e})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{json_path}: not a UTF-8 text file (a caption JSON)") from None
    if not isinstance(d, dict):
        raise ValueError(f"{json_path}: holds a {type(d).__name__}, not an object with global_caption and "
                         f"shot1..shotN")
    missing = [k for k in ["global_caption"] + [f"shot{i + 1}" for i in range(num_shots)] if k not in d]
    if missing:
        raise ValueError(f"{json_path} lacks {missing}: the caption JSON needs global_caption and "
                         f"shot1..shot{num_shots} (1-based), one per range in frame_number")
    for key in ["global_caption"] + [f"shot{i + 1}" for i in range(num_shots)]:
        if not isinstance(d[key], str):
            raise ValueError(f"{json_path}: {key} must be text, got {type(d[key]).__name__}")
        if key != "global_caption" and not d[key].strip():
            raise ValueError(f"{json_path}: {key} is empty; describe what happens in that shot")
    return d["global_caption"], [d[f"shot{i + 1}"] for i in range(num_shots)]


def read_story_clip(video_path, json_path, ranges, *, size: tuple[int, int] | None = None,
                    where: str = "") -> StoryClip:
    """Decode a clip (PyAV) up to the end of its last shot, with captions and absolute-range shot flags.

    size=(H, W) resizes frames while decoding (the caller picks the training geometry); None keeps the
    video's own size. Frames in gaps between shots are kept, with flag -1: the caller decides to drop them.
    where (e.g. "DIR/index.csv row 3") goes in front of errors about the video.
    """
    at = f"{where}: " if where else ""
    ranges = validate_ranges(ranges, where=f"{at}{json_path}: ")
    end = ranges[-1][1]
    try:
        frames, fps = read_mp4(video_path, size=size, max_frames=end)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{at}{e}") from None
    except av.error.FFmpegError as e:  # (some are ValueErrors too)
        raise ValueError(f"{at}{video_path} is not a readable video ({e.strerror or e}); re-export it as an "
                         f"mp4 (H.264) or drop the row") from None
    except ValueError as e:  # no frames
        raise ValueError(f"{at}{e}") from None
    validate_ranges(ranges, len(frames), where=f"{at}{video_path}: ")
    global_caption, shot_captions = read_captions(json_path, len(ranges))
    return StoryClip(frames, ranges, global_caption, shot_captions, shot_flags(ranges, len(frames)), fps,
                     source=f"{where} ({json_path})" if where else str(json_path))


def read_truth(path) -> tuple[Story, ShotGeometry, list[tuple[int, int]]]:
    """A .truth.json written by write_story -> (story, geometry, ranges)."""
    d = json.loads(Path(path).read_text())
    return Story.from_dict(d["story"]), ShotGeometry(**d["geometry"]), [tuple(r) for r in d["ranges"]]


def story_names(stories_dir) -> list[str]:
    """Names of the stories in a folder, in index order (from the CSV when present)."""
    stories_dir = Path(stories_dir)
    if (stories_dir / CSV_NAME).is_file():
        return [r.name for r in read_index(stories_dir / CSV_NAME)]
    return sorted(p.name[: -len(".truth.json")] for p in stories_dir.glob("*.truth.json"))
