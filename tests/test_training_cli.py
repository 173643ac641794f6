"""The training stages as a user meets them on the command line: config values checked by key, user errors
as one line (one rank under torchrun), reference-format data errors that name the file and the CSV row,
resume and already-done messages, and a process group that every rank leaves together."""
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from training import common
from training.common import (Checkpointer, Dist, StageConfig, StageInterrupted, load_stage_config, mark_done,
                             run_stage, save_config, train_loop)

REPO = Path(__file__).resolve().parents[1]


# --- 1. config values are coerced to the field's type, and checked ---------------------------------

@dataclass
class _Cfg(StageConfig):
    sizes: tuple[int, ...] = (1, 2)
    name: str = "x"
    extra: dict | None = None


def test_config_values_take_the_fields_type(tmp_path):
    """PyYAML reads 1e-4 (no dot) as a string: the float field still gets a float; an int field takes
    whole numbers in any spelling; str fields take numbers as text; unions and dicts stay as given."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nmax_steps: '20'\nbatch_size: 2.0\nname: 2024\nextra: {a: 1}\n")
    cfg = load_stage_config(_Cfg, path)
    assert cfg.lr == 1e-4 and type(cfg.lr) is float
    assert (cfg.max_steps, cfg.batch_size) == (20, 2) and type(cfg.max_steps) is type(cfg.batch_size) is int
    assert cfg.name == "2024" and cfg.extra == {"a": 1}
    cfg = load_stage_config(_Cfg, None, ["lr=1e-3", "warmup_steps=1e2", "max_minutes=3", "name="])
    assert (cfg.lr, cfg.warmup_steps, cfg.max_minutes, cfg.name) == (1e-3, 100, 3.0, "")
    assert type(cfg.warmup_steps) is int


@pytest.mark.parametrize("override, message", [
    ("lr=abc", "config lr: 'abc' is not a number"),
    ("max_steps=abc", "config max_steps: 'abc' is not a whole number"),
    ("max_steps=1.5", "config max_steps: 1.5 is not a whole number"),
    ("max_steps=true", "config max_steps: True is not a whole number"),
    ("lr=.inf", "config lr: inf is not a finite number"),
    ("flag=maybe", None),  # not a field: refused as before
    ("batch_size=-1", "config batch_size: -1 must be >= 1"),
    ("ckpt_every=0", "config ckpt_every: 0 must be >= 1"),
    ("log_every=0", "config log_every: 0 must be >= 1"),
    ("lr=0", "config lr: 0.0 must be > 0"),
    ("max_steps=-1", "config max_steps: -1 must be >= 0"),
    ("max_minutes=-2", r"config max_minutes: -2.0 must be >= 0 \(0 = no time budget\)"),
    ("seed=-1", "config seed: -1 must be >= 0"),
])
def test_config_values_are_refused_by_key_value_and_expectation(override, message):
    with pytest.raises(ValueError, match=message or "unknown config key"):
        load_stage_config(_Cfg, None, [override])


def test_a_malformed_config_file_or_override_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1,\n")
    with pytest.raises(ValueError, match=f"{bad} is not valid YAML at line 2, column 1"):
        load_stage_config(_Cfg, bad)
    bad.write_text("- lr\n")
    with pytest.raises(ValueError, match=f"{bad} must hold key: value lines, not a list"):
        load_stage_config(_Cfg, bad)
    with pytest.raises(ValueError, match=r"override 'lr=\[1,': '\[1,' is not a YAML value"):
        load_stage_config(_Cfg, None, ["lr=[1,"])


def test_zero_means_none_where_the_field_says_so():
    cfg = load_stage_config(_Cfg, None, ["max_minutes=0", "keep_checkpoints=0", "grad_clip=0", "max_steps=0",
                                         "lr_decay_steps=0", "warmup_steps=0", "stop_after=0"])
    assert cfg.max_steps == 0 and cfg.max_minutes == 0.0


# --- 2. user errors from the command line -----------------------------------------------------------

def _fails_with(exc):
    def train(cfg, dist):
        raise exc
    return train


def test_a_user_error_on_the_command_line_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    """argv None (the command line): ValueError, FileNotFoundError, ModelLoadError, a JSON or PyAV error
    print `error: <message>` alone and exit 2; a bug keeps its traceback; from Python (an argv list)
    every error is raised as is."""
    import av

    from shotstream_core.loading import ModelLoadError

    monkeypatch.setattr(sys, "argv", ["stage", "--set", f"out_dir={tmp_path}"])
    for exc in (ValueError("bad value"), FileNotFoundError("no file at x"), ModelLoadError("does not fit"),
                json.JSONDecodeError("Expecting value", "{,", 1),
                av.error.InvalidDataError(1094995529, "Invalid data found when processing input", "v.mp4")):
        with pytest.raises(SystemExit) as stop:
            run_stage(_fails_with(exc), StageConfig)
        assert stop.value.code == common.EXIT_USER_ERROR == 2
        err = capsys.readouterr().err
        assert err == f"error: {exc}\n", err
    with pytest.raises(RuntimeError, match="a bug"):
        run_stage(_fails_with(RuntimeError("a bug")), StageConfig)
    with pytest.raises(ValueError, match="bad value"):  # from Python
        run_stage(_fails_with(ValueError("bad value")), StageConfig, ["--set", f"out_dir={tmp_path}"])
    with pytest.raises(StageInterrupted):  # a pause is no error
        run_stage(_fails_with(StageInterrupted("paused")), StageConfig)
    monkeypatch.setenv("SHOTSTREAM_TRACEBACK", "1")  # to find a bug that raises a ValueError: the traceback
    with pytest.raises(ValueError, match="bad value"):
        run_stage(_fails_with(ValueError("bad value")), StageConfig)


def test_a_stage_refuses_a_bad_config_value_in_one_line():
    """The real entry point, in a process of its own: `--set lr=abc` was a 25-line TypeError in torch.optim."""
    res = subprocess.run([sys.executable, "-m", "training.stage2_ode", "--config",
                          str(REPO / "training/configs/micro-stage2.yaml"), "--set", "lr=abc"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert res.stderr == "error: config lr: 'abc' is not a number\n", res.stderr[-3000:]


def test_the_pipelines_launcher_stopped_by_a_signal_exits_quietly_with_128_plus_it(tmp_path):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM on the launcher: torchrun stops the ranks and raises a
    traceback of its own; training.torchrun stops them and exits 128 + the signal, printing nothing."""
    import signal
    import time

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(repo=str(REPO)))
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "training.torchrun", "--standalone", "--nproc_per_node", "2",
                                 str(script), "sleep", "--set", f"out_dir={tmp_path / 'out'}", "--set",
                                 "num_threads=1"], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while out.read_text().count("[sleeping]") < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err and "[torchrun]" not in err, err[-3000:]

@pytest.mark.parametrize("rank, local_rank, says", [(0, 0, "error: no config at a.yaml\n"),
                                                     (1, 1, ""),
                                                     (8, 0, "error: no config at a.yaml (on rank 8)\n"),
                                                     (9, 1, "")])
def test_a_user_error_before_the_process_group_is_said_once_on_each_node(monkeypatch, capsys, rank, local_rank,
                                                                          says):
    """Two nodes of 8 ranks: an error before the group exists (a config file, which each node reads from its
    own disk) is printed by the first rank of each node, so a file missing on node 1 alone is not left to
    rank 0, which does not have the error; the other ranks stop quietly with the same status."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(common, "USER_ERROR_GRACE_S", 0.0)
    assert common._report_cli_error(FileNotFoundError("no config at a.yaml")) == common.EXIT_USER_ERROR
    assert capsys.readouterr().err == says


class _Store:
    """The process group's key-value store, as _report_cli_error uses it."""

    def __init__(self, *keys):
        self.keys = set(keys)

    def set(self, key, value):
        self.keys.add(key)

    def check(self, keys):
        return all(k in self.keys for k in keys)


def test_a_user_error_several_ranks_have_but_rank_0_is_said_once_by_the_lowest(monkeypatch, capsys):
    """After the group exists (a data file read on one node's ranks only): rank 0 does not have the error, so
    the lowest rank that has it says it and the others, whose lower ranks have it too, stop quietly."""
    store = _Store()
    monkeypatch.setattr(common, "_default_store", lambda: store)
    monkeypatch.setattr(common, "USER_ERROR_GRACE_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "16")
    said = []
    for rank in (8, 9, 10):  # in the order they reach the error
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank - 8))
        assert common._report_cli_error(FileNotFoundError("no video at story.mp4")) == common.EXIT_USER_ERROR
        said.append(capsys.readouterr().err)
    assert said == ["error: no video at story.mp4 (on rank 8)\n", "", ""]
    assert store.check([common._ERROR_KEY.format(r) for r in (8, 9, 10)])

_TWO_RANKS = """
import os, sys
sys.path.insert(0, {repo!r})
from training import common
mode = sys.argv[1]
def train(cfg, dist):
    if mode == "sleep":  # a stage still running when the launcher is stopped
        print("[sleeping]", flush=True)
        import time
        time.sleep(120)
    if mode == "pause":  # what a stage does when its sitting's budget runs out
        raise common.pause_stage(cfg.out_dir, "budget spent at step 1; run it again to go on", dist.is_main)
    if mode == "both" or mode == f"rank{{dist.rank}}":
        raise FileNotFoundError("no video at story.mp4" + ("" if mode == "both" else f" (seen by rank {{dist.rank}})"))
    dist.barrier()  # the other rank waits for this one here
    print(f"[rank {{dist.rank}} finished]", flush=True)
    return {{}}
sys.argv = [sys.argv[0], *sys.argv[2:]]
common.run_stage(train, common.StageConfig)
"""


@pytest.mark.parametrize("mode", ["config", "both", "rank0", "rank1", "none"])
def test_a_user_error_under_torchrun_is_one_line_from_one_rank(tmp_path, mode):
    """2-process gloo: an error every rank has (a config value, before the group exists; a file, after)
    is printed by rank 0 alone; an error one rank alone has is printed by that rank, and the other rank,
    whose barrier lost its peer, stops quietly with no traceback; nobody hangs. A run without an error
    finishes on both ranks (they leave the group through a barrier)."""
    from test_training_infra import _run_torchrun

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(repo=str(REPO)))
    sets = ["--set", f"out_dir={tmp_path / 'out'}", "--set", "num_threads=1"]
    if mode == "config":
        sets += ["--set", "ckpt_every=0"]
    res = _run_torchrun([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         str(script), mode, *sets], timeout=90)
    if mode == "none":
        assert res.returncode == 0, res.stderr[-3000:]
        assert "[rank 0 finished]" in res.stdout and "[rank 1 finished]" in res.stdout
        return
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    want = {"config": "error: config ckpt_every: 0 must be >= 1",
            "both": "error: no video at story.mp4",
            "rank0": "error: no video at story.mp4 (seen by rank 0)",
            "rank1": "error: no video at story.mp4 (seen by rank 1) (on rank 1)"}[mode]
    assert ours == [want], res.stderr[-3000:]
    # no worker's traceback: neither the error's own nor a lost peer's (torchrun adds its own summary)
    for text in ("FileNotFoundError", "ValueError", "Connection closed", "gloo"):
        assert text not in res.stderr, res.stderr[-3000:]
    assert "finished]" not in res.stdout
    assert "exitcode  : 2" in res.stderr or "exitcode: 2" in res.stderr, res.stderr[-3000:]



@pytest.mark.parametrize("mode", ["both", "rank1", "pause"])
def test_the_pipelines_launcher_ends_a_stopped_stage_in_one_line_with_its_status(tmp_path, mode):
    """`python -m training.torchrun` (how the pipeline launches a distributed stage) is torchrun without its
    failure report: a stage's one-line error is followed by one line naming the rank, not by a traceback,
    and the launcher exits with the stage's status (torchrun: always 1), so a pause reads as a pause (75,
    and nothing printed after the stage's own message)."""
    from test_training_infra import _run_torchrun

    from training.common import EXIT_PAUSED, EXIT_USER_ERROR

    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS.format(repo=str(REPO)))
    sets = ["--set", f"out_dir={tmp_path / 'out'}", "--set", "num_threads=1"]
    res = _run_torchrun([sys.executable, "-m", "training.torchrun", "--standalone", "--nproc_per_node", "2",
                         str(script), mode, *sets], timeout=90)
    assert res.returncode == (EXIT_PAUSED if mode == "pause" else EXIT_USER_ERROR), res.stderr[-3000:]
    for text in ("Traceback", "ChildFailedError", "FAILED", "exitcode", "OMP_NUM_THREADS", "Sending process"):
        assert text not in res.stderr, res.stderr[-3000:]
    ours = [line for line in res.stderr.splitlines() if line.startswith("[torchrun]")]
    if mode == "pause":
        assert ours == [] and res.stdout == "[paused] budget spent at step 1; run it again to go on\n", res.stdout
    else:
        assert len(ours) == 1 and f"exited with status {EXIT_USER_ERROR} first" in ours[0], res.stderr[-3000:]
        assert [line for line in res.stderr.splitlines() if line.startswith("error:")], res.stderr[-3000:]

# --- 3. reference-format data errors name the file and the row ------------------------------------

@pytest.fixture
def one_story(tmp_path):
    """A one-story data set in the reference's format (Story World writes it as a user's data would be)."""
    from shotstream_core.config import get_preset
    from training.storyworld import make_story
    from training.storyworld.storage import write_index, write_story

    geometry = get_preset("micro").geometry
    row = write_story(make_story(3, 2), tmp_path, "0001", geometry)
    write_index(tmp_path, [row])
    return tmp_path, geometry


def _rows(data_dir):
    from training.storyworld.storage import read_index

    return read_index(data_dir)


def test_malformed_or_empty_captions_name_the_file_and_key(one_story):
    data, _ = one_story
    caps = data / "0001.json"
    good = json.loads(caps.read_text())
    (rec,) = _rows(data)
    caps.write_text("{,")
    with pytest.raises(ValueError, match=f"{caps}: not valid JSON"):
        rec.read()
    caps.write_text(json.dumps({**good, "shot2": "  "}))
    with pytest.raises(ValueError, match=f"{caps}: shot2 is empty"):
        rec.read()
    caps.write_text(json.dumps({**good, "shot1": 5}))
    with pytest.raises(ValueError, match=f"{caps}: shot1 must be text"):
        rec.read()
    caps.write_text(json.dumps({**good, "global_caption": ""}))  # a story may have no global caption
    assert rec.read().global_caption == ""


def test_an_unreadable_video_names_the_csv_row_and_the_file(one_story):
    data, _ = one_story
    (data / "0001.mp4").write_text("not a video")
    (rec,) = _rows(data)
    with pytest.raises(ValueError, match=rf"{data / 'index.csv'} row 2: {data / '0001.mp4'} is not a readable "
                                         rf"video"):
        rec.read()
    (data / "0001.mp4").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{data / 'index.csv'} row 2: no video at"):
        rec.read()


def test_a_short_shot_is_numbered_like_its_caption_key_and_named_by_row(one_story):
    """Shot 1 is the JSON's shot1 (the message said "shot 0"), the story and row are named, and the fix
    fits a user's own data, not only Story World's."""
    import dataclasses

    from training.data import read_clips, shot_frames

    data, geometry = one_story
    (rec, clip), = read_clips(data, 1, geometry)
    longer = dataclasses.replace(geometry, frames_per_shot=clip.ranges[0][1] - clip.ranges[0][0] + 4)
    with pytest.raises(ValueError) as err:
        shot_frames(clip, longer)
    msg = str(err.value)
    assert msg.startswith(f"{data / 'index.csv'} row 2 ({data / '0001.json'}): shot 1 (caption key shot1) has "), msg
    assert f"drop shots shorter than {longer.frames_per_shot} frames from index.csv" in msg
    assert "use a preset with shorter shots" in msg


def test_an_empty_index_says_so_and_what_it_needs(tmp_path):
    from training.storyworld.storage import CSV_FIELDS

    (tmp_path / "index.csv").write_text("")
    with pytest.raises(ValueError, match=r"index.csv is empty: it needs a header row " + ",".join(CSV_FIELDS)):
        _rows(tmp_path)
    (tmp_path / "index.csv").write_text(",".join(CSV_FIELDS) + "\n")
    with pytest.raises(ValueError, match="index.csv has a header but no stories: it needs a header row"):
        _rows(tmp_path)


def test_index_rows_a_user_writes_by_hand(tmp_path):
    """Excel's "CSV UTF-8" (a byte-order mark) reads; fractional frame numbers and two stories with one name
    (folders of caption.json + video.mp4: shards are keyed by the name) are refused by row."""
    from training.storyworld.storage import CSV_FIELDS

    header = ",".join(CSV_FIELDS)
    (tmp_path / "index.csv").write_bytes(("\ufeff" + header + '\n1,a.json,a.mp4,"[[0, 9], [9, 18]]"\n').encode())
    assert [r.ranges for r in _rows(tmp_path)] == [[(0, 9), (9, 18)]]
    (tmp_path / "index.csv").write_text(header + '\n1,a.json,a.mp4,"[[4.9, 26.9]]"\n')
    with pytest.raises(ValueError, match=r"row 2: shot ranges must be whole frame numbers"):
        _rows(tmp_path)
    (tmp_path / "index.csv").write_text(header + '\n1,story_a/caption.json,story_a/video.mp4,"[[0, 9]]"\n'
                                        '2,story_b/caption.json,story_b/video.mp4,"[[0, 9]]"\n')
    rows = _rows(tmp_path)  # readable (the VAE stages take clips as they come) ...
    from training.storyworld.storage import check_unique_names

    check_unique_names(rows[:1])  # ... and one of them alone is fine; both, as pre-encoding keys them, not
    with pytest.raises(ValueError, match=r"row 2 and .*row 3 both name their story 'caption'.*a file name of its own"):
        check_unique_names(rows)


# --- 4. resume, already done, and a config that changed -------------------------------------------

def _tiny_run(out, capsys, **kw):
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    def step_fn(step):
        opt.zero_grad()
        loss = net(torch.ones(1, 2)).pow(2).sum()
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    cfg = StageConfig(out_dir=str(out), max_steps=3, ckpt_every=1, **kw)
    summary = train_loop(cfg, Dist(), {"net": net}, {"net": opt}, step_fn, desc="tiny")
    captured = capsys.readouterr()
    return summary, captured.out, captured.err


def test_resume_and_already_done_say_where_they_stand(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(StageInterrupted):
        _tiny_run(out, capsys, stop_after=2)
    capsys.readouterr()
    summary, stdout, _ = _tiny_run(out, capsys)
    assert f"resumed from {Checkpointer(out).path(2)} (step 2 of 3)\n" in stdout
    mark_done(out, **summary)
    recorded = json.loads((out / "done.json").read_text())
    again, stdout, err = _tiny_run(out, capsys)
    assert stdout == f"already done at step 3 ({out / 'done.json'}): delete the folder to train it again\n"
    assert "tiny" not in err and "%" not in err  # no bare progress bar
    # a stage that writes done.json again from this summary keeps the run's record
    assert {k: again[k] for k in again} == {k: recorded[k] for k in again}
    assert again["resumed_from"] == 2


def test_a_changed_config_is_named_key_by_key_when_the_run_goes_on(tmp_path, capsys):
    def train(cfg, dist):
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
        return {}

    out = tmp_path / "run"
    out.mkdir()
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr=1e-3"])
    assert "warning" not in capsys.readouterr().out  # a fresh run
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr=1e-3", "--set", "max_minutes=5"])
    assert "warning" not in capsys.readouterr().out  # a sitting's budget changes no model
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "batch_size=4", "--set", "sizes=[3]"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning")]
    assert lines == [f"warning: this config differs from the one {out} was run with ({out / 'config.yaml'}): "
                     f"batch_size: 8 -> 4; lr: 0.001 -> 0.0002; sizes: (1, 2) -> (3,)"], lines


class _NextRecipe(_Cfg):
    RECIPE = _Cfg.RECIPE + 1  # the same stage after a change to its training code


def test_a_run_is_never_resumed_under_another_recipe_of_its_code(tmp_path, capsys):
    """A run records the RECIPE it started under; resumed after the stage's code changed it would end half
    one recipe and half the other: refused by name, its files untouched, unless the user says it is an
    experiment. A finished run asked for nothing new trains nothing and passes; a run from before the records
    goes on with a warning, and gets no record (its recipe is unknown)."""
    def train(cfg, dist):  # one sitting that pauses: a checkpoint, no done.json
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
        (Path(cfg.out_dir) / "checkpoints").mkdir(exist_ok=True)
        return {}

    out = tmp_path / "run"  # lr_decay_steps: a finished run may be lengthened (refuse_finished_run_changes)
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"])
    assert json.loads((out / "recipe.json").read_text()) == {"recipe": _Cfg.RECIPE}
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"])  # the same code: it resumes
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=rf"{out} holds a run that started under recipe {_Cfg.RECIPE} of this "
                                         rf"stage's code, which is at recipe {_NextRecipe.RECIPE} now.*delete that "
                                         r"folder.*allow_recipe_change=true"):
        run_stage(train, _NextRecipe, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    capsys.readouterr()
    run_stage(train, _NextRecipe, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "allow_recipe_change=true"])
    assert "the result is neither recipe" in capsys.readouterr().out
    assert json.loads((out / "recipe.json").read_text()) == {"recipe": _Cfg.RECIPE}  # still where it started

    mark_done(out, steps=3)  # finished: the same config under new code trains nothing, so it passes
    run_stage(train, _NextRecipe, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"])
    with pytest.raises(ValueError, match="started under recipe"):  # lengthened, it would train under both
        run_stage(train, _NextRecipe, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "max_steps=2000"])

    old = tmp_path / "old"  # a run in progress from before the records
    (old / "checkpoints").mkdir(parents=True)
    capsys.readouterr()
    run_stage(train, _NextRecipe, ["--set", f"out_dir={old}"])
    assert f"warning: {old} has no recipe.json" in capsys.readouterr().out
    assert not (old / "recipe.json").exists()


def test_a_finished_run_refuses_another_config_and_keeps_its_record(tmp_path, capsys):
    """Run again with another config, a finished run would train nothing yet save the new config as its
    own (the report would name settings it never ran; the stages on it would read as stale): refused by
    name, its files untouched. A sitting's settings or another device still run it; a larger max_steps
    goes on from it where the learning rate does not decay over max_steps (lr_decay_steps set; else the
    longer run's schedule would differ from what it ran); without its done.json it goes on with any config."""
    def train(cfg, dist):
        Path(cfg.out_dir).mkdir(exist_ok=True)
        save_config(cfg, Path(cfg.out_dir) / "config.yaml")
        mark_done(cfg.out_dir, steps=cfg.max_steps)
        return {}

    decaying = tmp_path / "decaying"  # lr over max_steps: a longer run would have bent its schedule
    run_stage(train, _Cfg, ["--set", f"out_dir={decaying}"])
    with pytest.raises(ValueError, match=r"another config \(max_steps: 1000 -> 2000\)"):
        run_stage(train, _Cfg, ["--set", f"out_dir={decaying}", "--set", "max_steps=2000"])

    out = tmp_path / "run"
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"])
    before = {n: (out / n).read_bytes() for n in ("config.yaml", "done.json")}
    with pytest.raises(ValueError, match=rf"{out} holds a finished run made with another config "
                                         r"\(lr: 0.0002 -> 0.001; sizes: \(1, 2\) -> \(3,\)\).*delete that folder"):
        run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "lr=1e-3", "--set", "sizes=[3]"])
    assert {n: (out / n).read_bytes() for n in before} == before
    for other in (["max_steps=500"], ["max_steps=2000", "lr=1e-3"]):  # shorter, or longer and otherwise
        with pytest.raises(ValueError, match="holds a finished run made with another config"):
            run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100"]
                      + [a for kv in other for a in ("--set", kv)])
    assert {n: (out / n).read_bytes() for n in before} == before
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "max_minutes=5", "--set", "device=cpu"])
    assert (out / "done.json").read_bytes() == before["done.json"]
    capsys.readouterr()
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "max_steps=2000"])  # lengthened: it goes on
    assert "max_steps: 1000 -> 2000" in capsys.readouterr().out
    assert json.loads((out / "done.json").read_text())["steps"] == 2000
    (out / "done.json").unlink()
    run_stage(train, _Cfg, ["--set", f"out_dir={out}", "--set", "lr_decay_steps=100", "--set", "max_steps=7", "--set", "lr=1e-3"])
    assert "lr: 0.0002 -> 0.001; max_steps: 2000 -> 7" in capsys.readouterr().out  # named as it goes on
    assert json.loads((out / "done.json").read_text())["steps"] == 7


# --- 5. every rank leaves the process group together ------------------------------------------------

def test_closing_the_group_waits_for_every_rank_first(monkeypatch):
    """A finished stage frees what still holds the group (DDP lives in a reference cycle, so without a
    collection its reducer and gloo threads outlive the group, to be freed at some later point, perhaps
    at exit), waits for every rank, then destroys the group; an error or a pause destroys it at once."""
    calls = []
    monkeypatch.setattr(common.torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(common.torch_dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(common.torch_dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(common.gc, "collect", lambda: calls.append("gc"))
    Dist(1, 2).close()
    assert calls == ["gc", "barrier", "destroy"]
    calls.clear()
    Dist(1, 2).close(synchronize=False)  # an error or a pause: the ranks may have stopped apart
    assert calls == ["destroy"]
    calls.clear()
    Dist().close()
    assert calls == []


def test_fitting_ones_own_videos_to_the_preset_is_noted(tmp_path, capsys):
    """Videos of another aspect ratio or frame rate are fitted to the preset (resized without cropping,
    each shot sampled to the preset's frames): said once, so a user knows before training on it."""
    from shotstream_core.config import ShotGeometry, get_preset
    from training.data import read_clips
    from training.storyworld.storage import write_stories
    from training.storyworld.world import training_stories

    micro = get_preset("micro").geometry
    for name, geometry, expected in (("same", micro, []),
                                     ("wide", ShotGeometry(32, 64, micro.frames_per_shot, micro.fps), ["aspect"]),
                                     ("fast", ShotGeometry(32, 32, micro.frames_per_shot, 30), ["30 fps"])):
        write_stories(training_stories(2, 2, 2), tmp_path / name, geometry)
        capsys.readouterr()
        clips = list(read_clips(tmp_path / name, 2, micro))
        assert len(clips) == 2 and all(c.frames.shape[1:3] == (32, 32) for _, c in clips)
        notes = capsys.readouterr().err.splitlines()
        assert len(notes) == len(expected) and all(n.startswith("note: ") and e in n
                                                   for e, n in zip(expected, notes)), notes
