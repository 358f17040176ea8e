"""Two gloo processes on loopback with per-rank batch B/2 reach the weights of one process with B."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tsds_interp.cli.train import main as train_main

STAGES = {"sft": ("sft", ["--batch-size", "32"]), "rl": ("rl", ["--questions-per-step", "8"])}


def _weights(folder):
    return load_file(str(folder / "checkpoint" / "model.safetensors"))


@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_match_one(trained_tiny, tmp_path, stage):
    paths, _ = trained_tiny
    init = paths["base"] if stage == "sft" else paths["sft"]
    _, extra = STAGES[stage]
    args = [stage, "--preset", "tiny", "--init", str(init), "--steps", "3", "--log-every", "1", "--quiet", *extra]
    assert train_main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tsds_interp.train", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("checkpoint: ") == 1, run.stdout
    one, two, start = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(init.parent)
    diff = torch.cat([(one[k] - two[k]).flatten() for k in one])
    moved = torch.cat([(one[k] - start[k]).flatten() for k in one])
    # Adam turns float-rounding differences in tiny gradients into small weight differences:
    # bound them relative to how far the weights moved.
    assert float(moved.norm()) > 0
    assert float(diff.norm() / moved.norm()) < 5e-3
    log_one = (tmp_path / "one" / "log.jsonl").read_text().splitlines()
    log_two = (tmp_path / "two" / "log.jsonl").read_text().splitlines()
    assert len(log_one) == len(log_two) == 3
    first_one, first_two = json.loads(log_one[0]), json.loads(log_two[0])
    for key in ("loss", "grad_norm", "entropy", *(("reward", "kl") if stage == "rl" else ())):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-4, abs=1e-6), key


def test_batch_not_divisible_by_processes_is_a_clear_error(trained_tiny, tmp_path):
    paths, _ = trained_tiny
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "tsds_interp.train", "sft", "--preset", "tiny", "--init", str(paths["base"]),
                          "--batch-size", "33", "--steps", "1", "--quiet", "--out", str(tmp_path / "x")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "--batch-size (33) must be divisible by the number of processes (2)" in run.stderr
    assert run.stderr.count("must be divisible") == 1, run.stderr  # one process speaks, not both
