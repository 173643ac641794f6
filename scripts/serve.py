"""Start ComfyUI with the ShotStream pack for interactive use; Ctrl-C stops it.

    python scripts/serve.py                    # http://127.0.0.1:8188
    python scripts/serve.py --port 8190 --models /path/to/models --output out/serve

Model files go in <models>/shotstream (or vae/, text_encoders/ (clip), diffusion_models/ (unet)), LoRAs in
<models>/loras; the bundled tiny model needs none. Open http://127.0.0.1:PORT/?load=story_5shot_video.json to load an example.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from comfy_host import ComfyHost, HostUnavailable, PortInUse, stop_on_signals  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Start ComfyUI with the ShotStream pack.")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--listen", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--models", default=str(REPO / ".cache" / "models"), help="models folder")
    parser.add_argument("--output", default=str(REPO / "out" / "serve"), help="output folder")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0 = torch default; 1 is fastest for the tiny model on CPU)")
    args = parser.parse_args(argv)

    # Ctrl-C and SIGTERM stop the host (also when the shell started us with SIGINT ignored: `serve.py &`)
    stop_on_signals()
    host = ComfyHost(models_dir=args.models, output_dir=args.output, port=args.port, listen=args.listen,
                     torch_threads=args.threads or None)
    try:
        with host:
            print(f"ComfyUI with the ShotStream pack: {host.url}")
            print(f"  examples: {host.url}/?load=story_3shot_starter.json  (also story_5shot_video.json, "
                  "story_branching.json)")
            print(f"  models:   {host.models_dir}/shotstream   outputs: {host.output_dir}   log: {host.log_path}")
            print("Ctrl-C to stop.", flush=True)
            try:
                while host.proc.poll() is None:
                    time.sleep(1)
                print(f"ComfyUI exited ({host.proc.returncode}); log:\n{host.log_tail()}", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                print("stopping", flush=True)
        return 0
    except PortInUse as e:
        print(f"{e}: use --port N", file=sys.stderr)
        return 1
    except HostUnavailable as e:
        print(f"ComfyUI did not start: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # while starting (start() stopped the child) or stopping
        print("stopped", file=sys.stderr)
        return 130
    finally:
        host.cleanup()  # the temp folder, whatever path we leave by


if __name__ == "__main__":
    sys.exit(main())
