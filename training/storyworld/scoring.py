"""Score a folder of generated videos against a folder of stored stories (one mp4 per story, same name)."""
from __future__ import annotations

from pathlib import Path

from .analyse import aggregate, check_shot_lengths, score_story
from .storage import read_mp4, read_truth, story_names


def score_dirs(stories_dir, videos_dir, *, per_story: bool = True) -> dict:
    """Metrics of videos_dir/NAME.mp4 against stories_dir/NAME.truth.json for every stored story."""
    stories_dir, videos_dir = Path(stories_dir), Path(videos_dir)
    names = story_names(stories_dir)
    if not names:
        raise FileNotFoundError(f"no stories (NAME.truth.json) in {stories_dir}; write them with "
                                f"`python -m training.storyworld make --out {stories_dir}`")
    missing = [n for n in names if not (videos_dir / f"{n}.mp4").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(names)} stories have no video in {videos_dir} "
                                f"(first: {missing[:3]}); generate NAME.mp4 for every story")
    truths = {n: read_truth(stories_dir / f"{n}.truth.json") for n in names}
    for n, (_, _, ranges) in truths.items():  # before any decoding: shots too short to score raise here
        check_shot_lengths([b - a for a, b in ranges], f"{stories_dir / n}: ")
    scores, rows = [], []
    for n in names:
        story, _, ranges = truths[n]
        frames, _ = read_mp4(videos_dir / f"{n}.mp4")
        s = score_story(story, frames, ranges)
        scores.append(s)
        rows.append({"name": n, "shots": story.num_shots, "adherence": s.adherence(),
                     "memory": s.memory_items, "cuts": s.analysis.cuts, "flicker": s.flicker})
    out = aggregate(scores)
    if per_story:
        out["stories"] = rows
    return out
