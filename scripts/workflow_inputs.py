"""The pictures the shipped workflows load (workflows/inputs/), drawn by the Story World renderer.

    python scripts/workflow_inputs.py      # rewrites workflows/inputs/; tests/test_workflows.py checks they match

ComfyHost copies them into its host's input folder; in your own ComfyUI, copy them into ComfyUI/input (or
drop one on the Load Image node).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INPUTS_DIR = REPO / "workflows" / "inputs"


def story_start() -> np.ndarray:
    """uint8 [64, 64, 3]: the purple triangle and the blue square in the meadow, a wide still shot: the opening
    of the story the other workflows tell, so story_from_image goes on with that story's later captions."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from training.storyworld.render import render_shot
    from training.storyworld.world import Character, Shot, Story

    story = Story("meadow", (Character("triangle", "purple"), Character("square", "blue")),
                  (Shot("wide", (0, 1), "still", 0.55, ((0.32, 0.64), (0.64, 0.64))),))
    return render_shot(story, 0)[0]


INPUTS = {"shotstream_story_start.png": story_start}


def main() -> None:
    from PIL import Image

    INPUTS_DIR.mkdir(parents=True, exist_ok=True)
    for name, draw in INPUTS.items():
        Image.fromarray(draw()).save(INPUTS_DIR / name)
        print(INPUTS_DIR / name)


if __name__ == "__main__":
    main()
