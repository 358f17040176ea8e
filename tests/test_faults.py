"""Faults: kill -9 while checkpointing, a torn log row, a replace cut between its renames, weights
that turn non-finite, saving over a user's folder, file modes, Ctrl-C during a long computation."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tsds_interp.model import load, save
from tsds_interp.train import Stage, preset_config, run_stage, save_checkpoint, train_stage

STEPS = dict(ckpt_every=1, eval_every=100, log_every=1)


def _equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_kill_9_while_checkpointing_every_step_loses_nothing(tmp_path):
    """SIGKILL at several moments of a run that checkpoints every step: the checkpoint always loads
    and ``--resume`` ends with the weights of an uninterrupted run."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "tsds_interp.train", "pretrain", "--preset", "tiny", "--steps", "40",
            "--ckpt-every", "1", "--eval-every", "100", "--log-every", "1", "--eval-questions", "8",
            "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.0, 0.37, 0.81):
        proc = subprocess.Popen([*args, *(["--resume"] if (out / "checkpoint").exists() else [])], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not (out / "checkpoint").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        load(out)  # the checkpoint is whole after every kill
    assert subprocess.run([*args, "--resume"], env=env, capture_output=True).returncode == 0
    straight = tmp_path / "straight"  # same process settings (thread count) as the killed run
    assert subprocess.run([*args[:-1], str(straight)], env=env, capture_output=True).returncode == 0
    assert _equal(load(out), load(straight))
    steps = [json.loads(r)["step"] for r in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


def test_resume_drops_a_torn_log_row_and_recovers_an_interrupted_replace(tmp_path):
    cfg = preset_config("tiny", "pretrain", steps=6, eval_questions=8, **STEPS)
    train_stage(cfg, tmp_path / "a", quiet=True)
    straight = load(train_stage(preset_config("tiny", "pretrain", steps=8, eval_questions=8, **STEPS),
                                tmp_path / "b", quiet=True))
    with open(tmp_path / "a" / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a row cut by a crash
    ckpt = tmp_path / "a" / "checkpoint"
    ckpt.rename(tmp_path / "a" / ".checkpoint.old")  # crash between the two renames of a replace
    (tmp_path / "a" / ".checkpoint.x1y2").mkdir()
    (tmp_path / "a" / ".checkpoint.x1y2" / "config.json").write_text("{")
    assert load(tmp_path / "a").cfg.n_layers == 2 and ckpt.is_dir()  # load recovers it
    ckpt.rename(tmp_path / "a" / ".checkpoint.old")
    resumed = load(train_stage(preset_config("tiny", "pretrain", steps=8, eval_questions=8, **STEPS),
                               tmp_path / "a", quiet=True, resume=True))
    assert _equal(resumed, straight)
    rows = [json.loads(r) for r in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = preset_config("tiny", "pretrain", steps=2, eval_questions=8, **STEPS)
    s = Stage.build(cfg)
    run_stage(s, tmp_path, quiet=True)
    kept = load(tmp_path)
    with torch.no_grad():
        next(s.model.parameters())[0] = float("nan")
    s.step += 1
    with pytest.raises(FloatingPointError, match="is not finite.*last checkpoint .* is kept"):
        save_checkpoint(s, tmp_path)
    assert _equal(load(tmp_path), kept)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    with pytest.raises(FloatingPointError, match="not finite"):
        save(s.model, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_save_never_deletes_a_users_folder_or_file(random_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a tsds_interp checkpoint"):
        save(random_model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("keep me too")
    with pytest.raises(ValueError, match="is a file"):
        save(random_model, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    save(random_model, tmp_path / "empty")
    save(random_model, tmp_path / "empty")  # over a checkpoint: replaced
    assert _equal(load(tmp_path / "empty"), random_model)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoint_modes_follow_the_umask(random_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = save(random_model, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in folder.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


def test_ctrl_c_during_patching_exits_130_with_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "o"
    # enough pairs that the run is still patching when the signal comes, even on a loaded machine
    proc = subprocess.Popen([sys.executable, "-m", "tsds_interp.patch", "--out", str(out), "--pairs", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a shell starts it
    seen, lines = threading.Event(), []

    def read():
        buf = ""
        while ch := proc.stderr.read(1):
            buf += ch
            if "patching:" in buf:
                seen.set()
        lines.append(buf)
    reader = threading.Thread(target=read)
    reader.start()
    assert seen.wait(180), "the progress bar never appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(60)
    finally:
        proc.kill()
    reader.join(10)
    assert code == 130, (signal.getsignal(signal.SIGINT), lines)
    err = lines[0].replace("\r", "\n")
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; nothing more was written"
    assert not out.exists()


def test_output_folders_that_belong_to_something_else_are_refused(random_model, tmp_path, monkeypatch):
    from tsds_interp import checks
    from tsds_interp.cli import probe as probe_cli
    from tsds_interp.cli import train as train_cli

    save(random_model, tmp_path / "ck")
    stage = tmp_path / "stage"
    (stage / "checkpoint").mkdir(parents=True)
    (stage / "run.json").write_text("{}")
    for bad, owner in ((tmp_path / "ck", "is a model checkpoint"), (tmp_path / "ck" / "sub", "is a model checkpoint"),
                       (stage, "is a training stage folder"), (stage / "probe", "is a training stage folder"),
                       (checks.PACKAGE_CHECKPOINTS / "x", "holds the shipped checkpoints")):
        with pytest.raises(ValueError, match=owner):
            checks.out_dir(bad)
    assert checks.out_dir(stage, stage=True) == stage  # a stage is its own output (to resume)
    with pytest.raises(ValueError, match="model checkpoint"):
        checks.out_dir(tmp_path / "ck", stage=True)
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert probe_cli.main(["--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "ck")]) == 2
    assert train_cli.main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "ck" / "x")]) == 2
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    with pytest.raises(ValueError, match="no device index"):
        checks.device("cpu:7")


def _state(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_tools_folder_is_its_own_a_rerun_leaves_no_stale_files_and_a_second_writer_is_refused(
        random_model, tmp_path, capsys):
    from tsds_interp.cli import patch as patch_cli
    from tsds_interp.cli import verify as verify_cli

    save(random_model, tmp_path / "ck")
    out = tmp_path / "o"
    patch = ["--checkpoint", str(tmp_path / "ck"), "--pairs", "4", "--granularity", "layer", "--quiet",
             "--out", str(out)]
    assert patch_cli.main(patch) == 0
    assert {"sampling_attn_out.png", "decision_attn_out.png"} <= set(_state(out))
    assert patch_cli.main([*patch, "--function", "decision"]) == 0  # a rerun that writes fewer files
    files = set(_state(out)) - {"run.json"}
    assert files == {"patching.csv", "decision_attn_out.png", "decision_mlp_out.png"}
    record = json.loads((out / "run.json").read_text())
    assert record["tool"] == "patch" and record["files"] == sorted(files)
    capsys.readouterr()

    verify = ["--checkpoint", str(tmp_path / "ck"), "--questions", "8", "--samples", "1", "--bootstrap", "10",
              "--out", str(out)]
    before = _state(out)
    assert verify_cli.main(verify) == 2  # another tool's finished run: refused before computing
    err = capsys.readouterr().err
    assert "holds a finished run of patch" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert _state(out) == before
    assert verify_cli.main([*verify, "--force"]) == 0  # replaces it: nothing of patch's run is left
    assert set(_state(out)) == {"verification.csv", "verification.png", "run.json"}
    capsys.readouterr()

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        before = _state(out)
        assert verify_cli.main(verify) == 2
        err = capsys.readouterr().err
        assert f"being written into by another process (pid {holder.pid})" in err and len(err.strip().splitlines()) == 1
        assert _state(out) == before
    finally:
        holder.kill()
        holder.wait()
    assert patch_cli.main(["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "fresh")]) == 2
    assert not (tmp_path / "fresh").exists()  # a failed run leaves no folder behind


def test_a_file_size_limit_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A real storage failure: the training process runs under a file-size limit smaller than its
    checkpoint (as a full disk would), so ``model.safetensors`` cannot be written."""
    import resource

    out = tmp_path / "stage"
    args = [sys.executable, "-m", "tsds_interp.train", "pretrain", "--preset", "tiny", "--eval-questions", "8",
            "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run([*args, "--steps", "2"], env=env, capture_output=True, timeout=300).returncode == 0
    saved = (out / "checkpoint" / "model.safetensors").read_bytes()
    limit = len(saved) // 2

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    run = subprocess.run([*args, "--steps", "4", "--resume"], env=env, capture_output=True, timeout=300,
                         preexec_fn=limited)
    err = run.stderr.decode()
    assert run.returncode == 2, err[-2000:]
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "File too large" in err or "too large" in err.lower(), err
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == saved  # the last checkpoint is intact
    assert [p.name for p in out.iterdir() if "tmp" in p.name] == []


def test_memory_is_checked_against_the_process_limit_and_an_allocator_failure_is_one_line(tmp_path):
    """Under ``ulimit -v 4G`` on a machine with more memory: weights past the limit are refused by the
    check, and weights that fit but whose training state does not end in one line, not torch's error."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))
    for sizes, words in ((["--d-model", "4096", "--n-layers", "8", "--d-mlp", "16384"],
                          "more than this process's address-space limit (4.0 GiB)"),
                         (["--d-model", "2048", "--n-layers", "8", "--d-mlp", "8192"],
                          "does not fit in memory (an allocation of")):
        run = subprocess.run([sys.executable, "-m", "tsds_interp.train", "pretrain", "--preset", "tiny", "--steps", "2",
                              "--quiet", "--out", str(tmp_path / "x"), *sizes], preexec_fn=limited,
                             capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        err = run.stderr.decode()
        assert run.returncode == 2 and words in err, err[-2000:]
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "x" / "checkpoint").exists()


def test_a_second_training_into_the_same_folder_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    from tsds_interp.checkpointing import FolderLock
    from tsds_interp.cli import train as train_cli

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "stage"
        out.mkdir()
        (out / ".lock").write_text(str(holder.pid))
        args = ["pretrain", "--preset", "tiny", "--steps", "2", "--eval-questions", "8", "--quiet", "--out", str(out)]
        assert train_cli.main(args) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not (out / "checkpoint").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train_cli.main(args) == 0  # the holder is gone: its lock is stale
    assert not (out / ".lock").exists()
    with FolderLock(tmp_path / "other") as lock:
        assert lock.path.read_text() == str(os.getpid())
    assert not lock.path.exists()


def _ship_state(dest):
    """(manifest names, table models, checkpoint folders) of a shipped folder."""
    import pandas as pd

    manifest = json.loads((dest / "manifest.json").read_text())
    table = pd.read_csv(dest / "heldout_metrics.csv")
    folders = {p.name for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return set(manifest), set(table.model), folders


def _ship_dying_at(k, stage, dest, metrics):
    """Ship ``stage`` as "second", the process dying (no cleanup) before its ``k``-th file operation."""
    import shutil
    from pathlib import Path

    from tsds_interp import ship as ship_module

    count = [0]

    def dying(fn):
        def op(*args, **kw):
            if count[0] == k:
                os._exit(9)
            count[0] += 1
            return fn(*args, **kw)
        return op
    for owner, name in ((shutil, "copyfile"), (shutil, "rmtree"), (Path, "write_text"), (Path, "replace"),
                        (Path, "rename"), (Path, "unlink")):
        setattr(owner, name, dying(getattr(owner, name)))
    ship_module.heldout_metrics = lambda model: metrics
    ship_module.load = lambda path: None  # no torch work in a forked child (its thread pool is the parent's)
    ship_module.ship(stage, "second", "cmd", dest=dest)
    os._exit(0)


def test_ship_is_a_transaction_whatever_the_moment_of_a_kill(trained_tiny, tmp_path, monkeypatch):
    """A process killed before each file operation of a ship, in turn: after ``finish_ship`` (run by
    the next ship and by every listing) the manifest, the metrics table and the checkpoint folders
    agree, and hold either the old state or the new one; no temp folder is listed as shipped."""
    import multiprocessing

    from tsds_interp import ship as ship_module
    from tsds_interp.model import shipped_names
    from tsds_interp.verification import heldout_metrics

    _, out = trained_tiny
    metrics = heldout_metrics(ship_module.load(out / "rl" / "checkpoint"))
    monkeypatch.setattr(ship_module, "heldout_metrics", lambda model: metrics)  # evaluated once, above
    outcomes = []
    for k in range(40):
        dest = tmp_path / f"k{k}"
        ship_module.ship(out / "sft", "first", "cmd", dest=dest)
        old = _ship_state(dest)
        child = multiprocessing.get_context("fork").Process(target=_ship_dying_at,
                                                            args=(k, out / "rl", dest, metrics))
        child.start()
        child.join(120)
        assert child.exitcode in (0, 9), (k, child.exitcode)  # it ran to its end or to its kill
        ship_module.finish_ship(dest)
        state = _ship_state(dest)
        assert state in (old, ({"first", "second"},) * 3), (k, state)
        assert not [p.name for p in dest.iterdir() if p.name.startswith(".")], k  # nothing left behind
        with pytest.MonkeyPatch.context() as m:
            m.setattr("tsds_interp.model.SHIPPED_DIR", dest)
            assert set(shipped_names()) == state[2]
        outcomes.append("new" if state != old else "old")
        if child.exitcode == 0:
            break
    assert child.exitcode == 0 and outcomes[0] == "old" and outcomes[-1] == "new", outcomes
    assert "new" in outcomes[:-1]  # some kills land after the commit point and are completed


def test_a_task_of_another_layout_than_the_models_is_refused(random_model):
    from tsds_interp.rollout import rollout
    from tsds_interp.task import TaskConfig, sample_questions

    task = random_model.tsds_config.task
    wide = TaskConfig(**{**task.to_dict(), "width": task.width + 1})
    with pytest.raises(ValueError, match="width=3 but the model was trained with 2"):
        rollout(random_model, sample_questions(wide, "test", 4, seed=0), task=wide)
    one = TaskConfig(**{**task.to_dict(), "budget": 1})
    r = rollout(random_model, sample_questions(task, "test", 4, seed=0), task=one)
    assert r.tokens.shape[1] < task.max_len  # another budget is a legitimate override


def test_hf_save_random_never_writes_over_a_project_checkpoint(random_model, tmp_path):
    from tsds_interp.hf import save_random

    save(random_model, tmp_path / "ck")
    before = (tmp_path / "ck" / "config.json").read_text()
    with pytest.raises(ValueError, match="model checkpoint"):
        save_random("gpt2", tmp_path / "ck", ["a", "b"])
    assert (tmp_path / "ck" / "config.json").read_text() == before


def test_malformed_torchrun_variables_and_storage_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from tsds_interp import cli
    from tsds_interp.cli import train as train_cli

    for env, words in ((dict(RANK="abc"), "RANK='abc' is not an integer"),
                       (dict(WORLD_SIZE="0"), "WORLD_SIZE=0 must be at least 1"),
                       (dict(RANK="3", WORLD_SIZE="2"), "RANK=3 but WORLD_SIZE=2")):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert train_cli.main(["pretrain", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not (tmp_path / "x" / "checkpoint").exists()

    def full_disk():
        raise SafetensorError("Error while serializing: IoError(No space left on device)")
    assert cli.run(full_disk) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write or read tensors") and len(err.strip().splitlines()) == 1


def test_a_second_interrupt_stops_at_once(tmp_path):
    """One SIGINT finishes the step and checkpoints; a second one (say, during a long evaluation)
    raises at once; the handlers are restored afterwards."""
    from tsds_interp.checkpointing import StopRequested

    before = signal.getsignal(signal.SIGINT)
    with StopRequested() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.flag
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_a_real_training_saves_a_checkpoint_that_resumes_exactly(tmp_path, sig):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C) sent to a running ``python -m tsds_interp.train``: it
    finishes the step, saves, exits 130 with one line and no lock left; ``--resume`` then ends with the
    weights of an uninterrupted run."""
    out = tmp_path / "signalled"
    args = [sys.executable, "-m", "tsds_interp.train", "pretrain", "--preset", "tiny", "--steps", "200",
            "--ckpt-every", "1000", "--eval-every", "1000", "--log-every", "1", "--eval-questions", "8",
            "--quiet", "--out", str(out)]  # long enough that a fast CPU is still running when signalled
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text().count("\n") >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().count("\n") == 0 and "stopped at step" in err and "Traceback" not in err
    assert (out / "checkpoint" / "train_state.json").is_file() and not (out / ".lock").exists()
    stopped = json.loads((out / "checkpoint" / "train_state.json").read_text())["step"]
    assert 3 <= stopped < 200
    assert subprocess.run([*args, "--resume"], env=env, capture_output=True).returncode == 0
    straight = tmp_path / "straight"
    assert subprocess.run([*args[:-1], str(straight)], env=env, capture_output=True).returncode == 0
    assert _equal(load(out), load(straight))


def test_a_missing_rendezvous_peer_is_an_error_within_seconds(tmp_path, monkeypatch, capsys):
    """WORLD_SIZE=2 with only one process started: a one-line error after TSDS_RENDEZVOUS_S seconds
    (not torch's 30-minute wait), exit 2, no checkpoint."""
    import socket

    from tsds_interp.cli import train as train_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     TSDS_RENDEZVOUS_S="2").items():
        monkeypatch.setenv(k, v)
    start = time.monotonic()
    assert train_cli.main(["pretrain", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert "did not all meet" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "x" / "checkpoint").exists()


def test_a_reader_that_goes_away_loses_no_results(tmp_path):
    """``python -m tsds_interp.patch | head -1``: the pipe breaks after the first line, the run still
    writes every file (run.json last) and exits 0."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tsds_interp.patch", "--out", str(tmp_path / "p")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader goes away
    _, err = proc.communicate(timeout=300)
    assert first.startswith(b"activation patching")
    assert proc.returncode == 0, err[-1000:]
    assert {"run.json", "patching.csv", "decision_head.png"} <= {p.name for p in (tmp_path / "p").iterdir()}
    assert b"Traceback" not in err and b"Broken pipe" not in err


def test_a_non_ascii_out_on_an_ascii_terminal_is_written_and_shown_escaped(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "r\u00e9sultats"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "ascii"}
    run = subprocess.run([sys.executable, "-m", "tsds_interp.patch", "--out", str(out)], env=env,
                         capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr[-1000:]
    assert (out / "run.json").is_file()
    assert b"r\\xe9sultats" in run.stdout and b"Traceback" not in run.stderr


def test_long_runs_warn_with_their_estimate_and_go_on(random_model, monkeypatch):
    """Every long loop (ablation's components, the probes' candidate sampling, verify's rollouts, the
    analyses' models) goes through ``rollout.progress``: past ``LONG_RUN_S`` it warns, and runs on."""
    import importlib

    from tsds_interp.ablation import ablation_sweep
    from tsds_interp.pairs import own_samples
    from tsds_interp.rollout import LongRunWarning
    from tsds_interp.task import sample_questions

    monkeypatch.setattr(importlib.import_module("tsds_interp.rollout"), "LONG_RUN_S", 0.0)
    with pytest.warns(LongRunWarning, match=r"zero ablation: 10 components will take about") as said:
        df = ablation_sweep(random_model, 4, quiet=True)
    assert df.component.nunique() == 10  # 2 layers x (4 heads + MLP): the run went on
    assert [w.filename for w in said if w.category is LongRunWarning] == [__file__]  # the caller's line
    task = random_model.tsds_config.task
    with pytest.warns(LongRunWarning, match="sampling candidates: 320 episodes will take about"):
        samples = own_samples(random_model, sample_questions(task, "test", 40, seed=0), task, 8, 1.0, 0)
    assert samples.shape == (40, 8)


def test_one_ctrl_c_during_a_long_evaluation_is_honoured_at_the_next_row_chunk(tmp_path, monkeypatch):
    """A real SIGINT arrives while training evaluates 10 row chunks: evaluation stops after the chunk
    it is in, the step is checkpointed and training stops, without waiting for the other 9 chunks."""
    import importlib

    from tsds_interp.checkpointing import Interrupted

    train_module = importlib.import_module("tsds_interp.train")
    real, chunks = train_module.rollout, []

    def slow_chunk(*args, **kw):
        chunks.append(kw["rows"])
        if len(chunks) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        return real(*args, **kw)
    monkeypatch.setattr(train_module, "rollout", slow_chunk)
    cfg = preset_config("tiny", "pretrain", steps=5, eval_every=1, eval_questions=10 * train_module.EVAL_CHUNK,
                        ckpt_every=100, log_every=1)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted, match="stopped at step 1"):
        run_stage(Stage.build(cfg), tmp_path / "stage", quiet=True)
    assert chunks == [slice(0, train_module.EVAL_CHUNK)]
    assert json.loads((tmp_path / "stage" / "checkpoint" / "train_state.json").read_text())["step"] == 1
    row = json.loads((tmp_path / "stage" / "log.jsonl").read_text().splitlines()[-1])
    assert row["step"] == 1 and not any(k.startswith("eval_") for k in row)  # no half-evaluated metrics
    assert signal.getsignal(signal.SIGINT) is before
