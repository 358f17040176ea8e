"""Bad input through every CLI's ``main(argv)``: exit code 2, one line on stderr naming the problem,
no traceback, and nothing written or changed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TASK
from safetensors.torch import load_file, save_file

from tsds_interp import ship as ship_library
from tsds_interp.cli import ablation, attribution, bench, patch, probe, ship, train, verify
from tsds_interp.model import ModelConfig, build_model, save
from tsds_interp.task import TaskConfig

TINY = TINY_TASK
WIDE = TaskConfig(width=3, budget=2, train_cells=((1, 1), (1, 2), (2, 1)), ood_cells=((2, 2),))
STAGE_ARGS = ["--preset", "tiny", "--steps", "2", "--ckpt-every", "1", "--eval-every", "2",
              "--eval-questions", "8", "--quiet"]


def _edit_config(folder, **changes):
    meta = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            meta[section][name] = value
        else:
            meta[section] = value
    (folder / "config.json").write_text(json.dumps(meta))


def _edit_weights(folder, change):
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: change(v) if i == 0 else v for i, (k, v) in enumerate(state.items())},
              str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder of inputs: good and damaged checkpoints, a trained stage, a file, a shipped dir."""
    root = tmp_path_factory.mktemp("bad_input")
    ok = save(build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, task=TINY)), root / "ok")
    save(build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, task=WIDE)), root / "wide")
    damaged = {
        "layers_float": lambda f: _edit_config(f, model__n_layers=2.5),
        "task_list": lambda f: _edit_config(f, model__task=[1, 2]),
        "huge": lambda f: _edit_config(f, model__d_model=1048576, model__n_heads=2),
        "version": lambda f: _edit_config(f, format_version=99),
        "not_utf8": lambda f: (f / "config.json").write_bytes(b"\xff\xfe{"),
        "nan": lambda f: _edit_weights(f, lambda v: torch.full_like(v, float("nan"))),
        "fp16": lambda f: _edit_weights(f, lambda v: v.half()),
        "int": lambda f: _edit_weights(f, lambda v: v.long()),
        "truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
    }
    for name, damage in damaged.items():
        folder = save(build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, task=TINY)),
                      root / f"bad_{name}")
        damage(folder)
    assert train.main(["pretrain", "--out", str(root / "stage"), *STAGE_ARGS]) == 0
    for name, damage in {"opt": lambda c: (c / "optimizer.safetensors").write_bytes(b"\0" * 10),
                         "state": lambda c: (c / "train_state.json").write_text("")}.items():
        assert train.main(["pretrain", "--out", str(root / f"stage_{name}"), *STAGE_ARGS]) == 0
        damage(root / f"stage_{name}" / "checkpoint")
    (root / "afile").write_text("x")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "shipped").mkdir()
    ship_library.ship(root / "stage", "taken", "cmd", dest=root / "shipped")
    (root / "shipped_bad_table").mkdir()
    (root / "shipped_bad_table" / "heldout_metrics.csv").write_bytes(b"\xff\x00\x01,\n\"unterminated")
    (root / "shipped_bad_manifest").mkdir()
    (root / "shipped_bad_manifest" / "manifest.json").write_text("{not json")
    shutil.copytree(root / "stage" / "checkpoint", root / "stage_bad_run" / "checkpoint")
    (root / "stage_bad_run" / "run.json").write_text("[1, 2")
    assert ok.is_dir()
    return root


def _snapshot(root):
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


BAD_CHECKPOINTS = [("bad_layers_float", "n_layers must be an integer"), ("bad_task_list", "task"),
                   ("bad_huge", "d_model must be an integer in [1, 65536]"), ("bad_version", "format version 99"),
                   ("bad_not_utf8", "not UTF-8"), ("bad_nan", "NaN or infinite"), ("bad_fp16", "torch.float16"),
                   ("bad_int", "torch.int64"), ("bad_truncated", "not a readable safetensors"),
                   ("missing", "no checkpoint folder")]

CASES = [
    # train: every flag checked before a model is built or a folder made
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--device", "cuda"], "CUDA is not available"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--device", "bogus"], "'bogus' is not a device"),
    (train, ["pretrain", "--out", "{root}/afile", "--preset", "tiny"], "is a file; give a folder"),
    (train, ["pretrain", "--out", "{root}/afile/sub", "--preset", "tiny"], "cannot be created"),
    (patch, ["--out", "{root}/dangling"], "is a link to"),
    (probe, ["--out", "{root}/dangling/sub"], "which does not exist; give another folder"),
    (verify, ["--out", "/proc/tsds_out"], "files cannot be created in /proc"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--width", "10"], "width must be an"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--grad-clip", "-1"], "--grad-clip"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--lr", "0"], "--lr"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--warmup", "-5"], "--warmup"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--steps", "0"], "--steps"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--seed", "-1"], "--seed"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--temperature", "nan"], "--temperature"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--discount", "nan"], "--discount"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--clip-eps", "-1"], "--clip-eps"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--decision-share", "5"], "--decision-share"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--eval-temperature", "-1"], "--eval-temperature"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--d-model", "1048576"], "d_model"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--n-layers", "x"], "invalid int value: 'x'"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--train-cells", "1y2"], "--train-cells"),
    (train, ["pipeline", "--out", "{root}/new", "--preset", "tiny", "--group", "1"], "--group"),
    (train, ["rl", "--out", "{root}/new", "--preset", "tiny", "--init", "{root}/ok", "--group", "1"], "--group"),
    (train, ["sft", "--out", "{root}/new", "--preset", "tiny"], "pass --init"),
    (train, ["sft", "--out", "{root}/new", "--preset", "tiny", "--init", "{root}/missing"], "--init: no checkpoint"),
    (train, ["sft", "--out", "{root}/new", "--preset", "tiny", "--init", "{root}/bad_layers_float"], "n_layers"),
    (train, ["rl", "--out", "{root}/new", "--preset", "tiny", "--init", "{root}/ok", "--ref", "{root}/wide"],
     "another task"),
    (train, ["pretrain", "--out", "{root}/new", "--preset", "tiny", "--resume"], "nothing to resume"),
    (train, ["pretrain", "--out", "{root}/stage", "--preset", "tiny"], "already holds a checkpoint"),
    (train, ["pretrain", "--out", "{root}/stage", *STAGE_ARGS, "--resume", "--seed", "1"], "--seed is 1"),
    (train, ["pretrain", "--out", "{root}/stage", *STAGE_ARGS, "--resume", "--n-layers", "3"], "--n-layers is 3"),
    (train, ["pretrain", "--out", "{root}/stage_opt", *STAGE_ARGS, "--resume", "--steps", "4"], "damaged optimizer"),
    (train, ["pretrain", "--out", "{root}/stage_state", *STAGE_ARGS, "--resume", "--steps", "4"], "damaged"),
    (train, ["bogus-stage", "--out", "{root}/new"], "invalid choice"),
    (train, ["pretrain"], "--out"),
    # patch
    (patch, ["--out", "{root}/new", "--pairs", "0"], "--pairs: must be an integer in [1, 10000]"),
    (patch, ["--out", "{root}/new", "--pairs", "10000000"], "--pairs"),
    (patch, ["--out", "{root}/new", "--top", "-3"], "--top"),
    (patch, ["--out", "{root}/new", "--memory-mb", "nan"], "--memory-mb"),
    (patch, ["--out", "{root}/new", "--ig-steps", "0"], "--ig-steps"),
    (patch, ["--out", "{root}/new", "--seed", "-1"], "--seed"),
    (patch, ["--out", "{root}/new", "--cells", "7x7"], "7x7"),
    (patch, ["--out", "{root}/afile"], "is a file"),
    (patch, ["--out", "{root}/new", "--device", "cuda:3"], "--device"),
    (patch, ["--out", "{root}/new", "--granularity", "atom"], "invalid choice"),
    # ablation, attribution, verify, probe
    (ablation, ["--out", "{root}/new", "--threshold", "nan"], "--threshold"),
    (ablation, ["--out", "{root}/new", "--questions", "0"], "--questions"),
    (ablation, ["--out", "{root}/new", "--max-batch", "0"], "--max-batch"),
    (ablation, ["--out", "{root}/afile"], "is a file"),
    (attribution, ["--out", "{root}/new", "--group", "1"], "--group"),
    (attribution, ["--out", "{root}/new", "--decision-share", "5"], "--decision-share"),
    (attribution, ["--out", "{root}/new", "--checkpoint", "{root}/ok", "--ref", "{root}/wide"], "another task"),
    (attribution, ["--out", "{root}/new", "--ref", "{root}/missing"], "--ref: no checkpoint"),
    (verify, ["--out", "{root}/new", "--temperature", "-1"], "--temperature"),
    (verify, ["--out", "{root}/new", "--samples", "0"], "--samples"),
    (verify, ["--out", "{root}/new", "--bootstrap", "5"], "--bootstrap"),
    (verify, ["--out", "{root}/new", "--cells", "9x9"], "9x9"),
    (probe, ["--out", "{root}/new", "--train-questions", "3"], "--train-questions"),
    (probe, ["--out", "{root}/new", "--temperature", "inf"], "--temperature"),
    # ship: everything checked before anything is written
    (ship, ["{root}/stage", "taken", "--command", "c"], "pass --force"),
    (ship, ["{root}/stage", "not a name", "--command", "c"], "plain identifier"),
    (ship, ["{root}/stage", "x", "--command", " "], "--command is empty"),
    (ship, ["{root}/new", "x", "--command", "c"], "train the stage first"),
    (ship, ["{root}/stage_bad_run", "x", "--command", "c"], "run.json is not valid JSON"),
    # bench
    (bench, ["nope"], "unknown entry 'nope'"),
    (bench, ["--json", "{root}"], "is a folder"),
]
CASES += [(m, ["--out", "{root}/new", "--checkpoint", f"{{root}}/{name}"], words)
          for m in (patch, ablation, verify, probe, attribution) for name, words in BAD_CHECKPOINTS[:5]]
CASES += [(patch, ["--out", "{root}/new", "--checkpoint", f"{{root}}/{name}"], words)
          for name, words in BAD_CHECKPOINTS]
CASES += [(train, ["rl", "--out", "{root}/new", "--preset", "tiny", "--init", f"{{root}}/{name}"], words)
          for name, words in BAD_CHECKPOINTS]


@pytest.mark.parametrize("module,argv,words", CASES,
                         ids=[f"{m.__name__.split('.')[-1]}:{' '.join(a)[:60]}" for m, a, _ in CASES])
def test_bad_input_one_line_exit_2_nothing_written(world, module, argv, words, capsys, monkeypatch):
    monkeypatch.setattr(ship_library, "SHIPPED_DIR", world / "shipped")
    before = _snapshot(world)
    rc = module.main([a.format(root=world) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert words in err, err
    assert "Traceback" not in err + out
    assert _snapshot(world) == before


@pytest.mark.parametrize("dest,words", [("shipped_bad_table", "heldout_metrics.csv"),
                                        ("shipped_bad_manifest", "manifest.json is not valid JSON")])
def test_ship_damaged_records_refused_before_copying(world, dest, words, capsys, monkeypatch):
    monkeypatch.setattr(ship_library, "SHIPPED_DIR", world / dest)
    before = _snapshot(world)
    assert ship.main([str(world / "stage"), "fresh", "--command", "c"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err
    assert _snapshot(world) == before and not (world / dest / "fresh").exists()


def _library_cases(model):
    from tsds_interp.ablation import ablation_sweep
    from tsds_interp.objectives import advantages
    from tsds_interp.patching import activation_patch, attribution_patch, run_patching
    from tsds_interp.presets import TrainConfig
    from tsds_interp.rollout import rollout
    from tsds_interp.task import sample_questions
    from tsds_interp.verification import verification_metrics

    tokens = torch.zeros(2, 7, dtype=torch.long)
    metric = lambda logits: logits[:, -1, 0].mean()  # noqa: E731
    q = sample_questions(TINY, "train", 4, seed=0)
    return {
        "grad_clip": (lambda: TrainConfig(grad_clip=-1.0), "--grad-clip", ["pretrain", "--grad-clip", "-1"]),
        "width": (lambda: TaskConfig(width=10), None, None),
        "n_layers": (lambda: ModelConfig(n_layers=2.5), None, None),
        "shape": (lambda: attribution_patch(model, tokens, tokens[:, :-1], metric), None, None),
        "shape_exact": (lambda: activation_patch(model, tokens, tokens[:, :-1], metric), None, None),
        "direction": (lambda: attribution_patch(model, tokens, tokens, metric, direction="sideways"), None, None),
        "batch_size": (lambda: rollout(model, q, batch_size=0), None, None),
        "group": (lambda: advantages(torch.zeros(4), 1), None, None),
        "pairs": (lambda: run_patching(model, "sampling", n_pairs=0), "--pairs", ["--pairs", "0"]),
        "samples": (lambda: verification_metrics(model, samples=0), "--samples", ["--samples", "0"]),
        "threshold": (lambda: ablation_sweep(model, threshold=float("nan")), "--threshold", ["--threshold", "nan"]),
    }


LIBRARY_WORDS = {"grad_clip": "must be a finite number in (0, 1000000], got -1.0",
                 "width": "width must be an integer in [1, 9], got 10",
                 "n_layers": "n_layers must be an integer in [1, 256], got 2.5",
                 "shape": "must have the same shape", "shape_exact": "must have the same shape",
                 "direction": "direction must be 'denoise' or 'noise'",
                 "batch_size": "batch_size must be an integer in [1,",
                 "group": "group must be >= 2", "pairs": "must be an integer in [1, 10000], got 0",
                 "samples": "must be an integer in [1, 1024], got 0",
                 "threshold": "must be a finite number in [0, 1], got nan"}
CLI_OF = {"grad_clip": train, "pairs": patch, "samples": verify, "threshold": ablation}


@pytest.mark.parametrize("case", list(LIBRARY_WORDS))
def test_library_raises_value_error_with_the_cli_words(world, case, capsys):
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, task=TINY))
    call, _, argv = _library_cases(model)[case]
    with pytest.raises(ValueError) as e:
        call()
    assert LIBRARY_WORDS[case] in str(e.value)
    if argv is not None:  # the flag feeding this argument fails with the same rule
        argv = [argv[0], "--out", str(world / "new"), *argv[1:]] if case == "grad_clip" else \
            ["--out", str(world / "new"), *argv]
        assert CLI_OF[case].main(argv) == 2
        err = capsys.readouterr().err
        assert LIBRARY_WORDS[case] in err, err


ANALYSES_DIR = Path(__file__).parent.parent / "analyses"
ANALYSES = sorted(p.stem for p in ANALYSES_DIR.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("script", ANALYSES)
def test_every_analysis_cli_refuses_bad_flags_in_one_line(script, tmp_path):
    """Each analysis script checks its flags while parsing: one ``error:`` line, exit 2, nothing written."""
    path = ANALYSES_DIR / f"{script}.py"
    flag = "--steps" if script == "ds_toy_model" else "--questions"
    proc = subprocess.run([sys.executable, str(path), flag, "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()
