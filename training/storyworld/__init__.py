"""Story World: a small synthetic multi-shot world to train ShotStream on and to measure it with.

Public API
    world:    make_story(seed_or_rng, num_shots) -> Story;  make_split("train" | "eval5" | "eval10", n)
              Story.global_caption, Story.shot_captions, Story.captions_json(), Story.to_dict()
    render:   render_story(story, geometry) -> (uint8 [N, H, W, 3], [(start, end), ...]);  render_shot
    storage:  write_story / write_stories (reference format: index.csv, NAME.json, NAME.mp4, plus
              NAME.truth.json);  read_index(csv) -> [ClipRecord];  read_story_clip(video, json, ranges)
              -> StoryClip (frames, ranges, captions, absolute-range shot flags);  read_truth
    analyse:  analyse_video(frames, ranges) -> VideoAnalysis;  detect_cuts(frames, shortest_shot=None);
              check_shot_lengths(lengths) (ValueError below MIN_SHOT_FRAMES: 5, 9, 13, ... frames work);
              score_story(story, frames, ranges) -> StoryScore;  aggregate([StoryScore]) -> metrics dict;
              score_dirs(stories_dir, videos_dir) -> metrics dict
    sheet:    contact_sheet(frames, ranges, captions) -> PIL image;  sheet_for(path)
CLI: python -m training.storyworld {make, score, sheet} --help
"""
from .analyse import (VideoAnalysis, StoryScore, aggregate, analyse_shot, analyse_video, check_shot_lengths,
                      detect_cuts, score_story)
from .render import default_geometry, render_shot, render_story
from .scoring import score_dirs
from .sheet import contact_sheet, sheet_for
from .storage import (ClipRecord, StoryClip, read_index, read_mp4, read_story_clip, read_truth, shot_flags,
                      write_index, write_mp4, write_stories, write_story)
from .world import (COLOURS, EVAL_SEED, FRAMINGS, MOTIONS, PLACES, SHAPES, TRAIN_SEED, Character, Hidden,
                    Shot, Story, make_split, make_story, story_seed)

__all__ = [
    "COLOURS", "EVAL_SEED", "FRAMINGS", "MOTIONS", "PLACES", "SHAPES", "TRAIN_SEED",
    "Character", "Hidden", "Shot", "Story", "make_split", "make_story", "story_seed",
    "default_geometry", "render_shot", "render_story",
    "ClipRecord", "StoryClip", "read_index", "read_mp4", "read_story_clip", "read_truth", "shot_flags",
    "write_index", "write_mp4", "write_stories", "write_story",
    "VideoAnalysis", "StoryScore", "aggregate", "analyse_shot", "analyse_video", "check_shot_lengths", "detect_cuts",
    "score_story", "score_dirs", "contact_sheet", "sheet_for",
]
