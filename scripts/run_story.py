"""The main job: run the 5-shot example workflow in a real ComfyUI host and write the video + contact sheet.

    python scripts/run_story.py                      # -> out/story/ (mp4, webp, saved state, contact sheet)
    python scripts/run_story.py --workflow workflows/story_branching.api.json --out out/branching

Starts ComfyUI (fetched once with pip into .cache/comfyui) with this pack on a free localhost port, queues
the API-format workflow, waits for it, stops the host, and prints where the files are.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from comfy_host import ComfyHost, HostUnavailable, load_workflow, stop_on_signals  # noqa: E402


def sheet_from_state(state_path: Path, out: Path) -> Path:
    """Contact sheet (a few frames of every shot, its caption above them) of a saved story state."""
    import numpy as np

    from shotstream_core.state import StoryState
    from training.storyworld.sheet import contact_sheet

    state = StoryState.load(state_path)
    lengths = [s.num_frames for s in state.shots]
    starts = np.cumsum([0] + lengths)
    ranges = [(int(a), int(a) + n) for a, n in zip(starts, lengths)]
    frames = (state.frames().numpy() * 255).round().astype(np.uint8)
    image = contact_sheet(frames, ranges, [s.caption for s in state.shots], state.shots[0].global_caption)
    image.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Run a ShotStream workflow in a real ComfyUI host.")
    parser.add_argument("--workflow", default=str(REPO / "workflows" / "story_5shot_video.api.json"),
                        help="API-format workflow (default: the 5-shot example)")
    parser.add_argument("--out", default=str(REPO / "out" / "story"), help="output folder")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the workflow")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the host's torch (1 is fastest for the tiny model; 0 = torch default)")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    prompt = load_workflow(args.workflow)
    # Ctrl-C and SIGTERM stop the host (also when the shell started us with SIGINT ignored)
    stop_on_signals()
    try:
        return run(prompt, out, args)
    except KeyboardInterrupt:  # the host is stopped and its temp folder gone
        print("stopped", file=sys.stderr)
        return 130


def run(prompt: dict, out: Path, args) -> int:
    log = out / "comfyui.log"
    host = ComfyHost(output_dir=out, torch_threads=args.threads or None)
    t0 = time.monotonic()
    try:
        with host:
            print(f"ComfyUI with the ShotStream pack at {host.url}", flush=True)
            result = host.run(prompt, timeout=args.timeout)
    except HostUnavailable as e:
        print(f"ComfyUI: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            out.mkdir(parents=True, exist_ok=True)
            # keep the host's log beside the outputs
            if host.log_path.exists():
                log.write_text(host.log_path.read_text(errors="replace"))
            log_tail = host.log_tail(3000)
        finally:
            host.cleanup()
    if result.status != "success":
        print(f"workflow failed: {result.error_message or 'interrupted'}\n{log_tail}", file=sys.stderr)
        return 1

    videos = [host.output_path(v) for v in result.files("videos")]
    states = [out / (line[len("saved "):] + ".safetensors")
              for node in result.outputs.values() for line in node.get("text", []) if line.startswith("saved ")]
    sheets = [sheet_from_state(s, s.with_name(s.stem + "_sheet.png")) for s in states]
    print(f"done in {time.monotonic() - t0:.1f} s")
    for label, paths in (("video", videos), ("story state", states), ("contact sheet", sheets), ("host log", [log])):
        for p in paths:
            print(f"{label:>13}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
