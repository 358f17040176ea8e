import json
import math

import pytest
import torch

from tsds_interp.cli.train import main
from tsds_interp.data import reflective_sft_data, solution_batch
from tsds_interp.model import load
from tsds_interp.objectives import token_logprobs
from tsds_interp.task import ACCEPT, DECISION, REJECT, SAMPLE, token_roles
from tsds_interp.train import Stage, preset_config, rl_batch, rl_loss, run_stage, train_stage, update


def test_tiny_pipeline_runs_every_stage(trained_tiny):
    paths, out = trained_tiny
    for name in ("base", "sft", "rl"):
        assert (out / name / "metrics.csv").is_file()
        load(paths[name])
        assert json.loads((out / name / "run.json").read_text())["forward"] == "own weights"  # the fast path ran
    rows = [json.loads(r) for r in (out / "rl" / "log.jsonl").read_text().splitlines()]
    assert any("eval_realized_accuracy" in r for r in rows) and all(math.isfinite(r["loss"]) for r in rows)


def test_one_policy_gradient_step_raises_the_logprob_of_rewarded_episodes(trained_tiny, tmp_path):
    """The mechanism RL relies on, not a training outcome: one small step on a batch raises the
    advantage-weighted log-probability of its episodes (first order in the step size)."""
    paths, _ = trained_tiny
    cfg = preset_config("tiny", "rl", steps=1, lr=1e-4, warmup=1, beta=0.0, log_every=100, eval_every=100)
    s = Stage.build(cfg, init=paths["sft"])
    batch = rl_batch(s)
    tokens, roles, old_logp, adv = batch.tokens, batch.roles, batch.old_logp, batch.advantage
    assert (adv > 0).any() and (adv < 0).any()
    terms, _ = rl_loss(s, batch)
    update(s, terms, log=False)
    with torch.no_grad():
        new_logp, _ = token_logprobs(s.model, tokens)
    counted = (roles == SAMPLE) | (roles == DECISION)
    change = ((new_logp - old_logp) * counted).sum(1)
    assert (adv * change).sum() > 0


def test_resume_is_bit_exact(tmp_path):
    cfg = preset_config("tiny", "pretrain", steps=12, ckpt_every=100, eval_every=100, log_every=4)
    straight = load(train_stage(cfg, tmp_path / "a", quiet=True))
    from tsds_interp.train import Interrupted
    with pytest.raises(Interrupted):
        train_stage(cfg, tmp_path / "b", quiet=True, stop_after=5)
    resumed = load(train_stage(cfg, tmp_path / "b", quiet=True, resume=True))
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    steps = [json.loads(r)["step"] for r in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_rl_resume_is_bit_exact(trained_tiny, tmp_path):
    paths, _ = trained_tiny
    cfg = preset_config("tiny", "rl", steps=4, ckpt_every=100, eval_every=100, log_every=2)
    straight = load(train_stage(cfg, tmp_path / "a", init=paths["sft"], quiet=True))
    from tsds_interp.train import Interrupted
    with pytest.raises(Interrupted):
        train_stage(cfg, tmp_path / "b", init=paths["sft"], quiet=True, stop_after=2)
    resumed = load(train_stage(cfg, tmp_path / "b", init=paths["sft"], quiet=True, resume=True))
    assert all(torch.equal(v, w) for v, w in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_solution_batch_is_correct_and_accepted():
    cfg = preset_config("tiny", "pretrain")
    task = cfg.task()
    tokens = solution_batch(task, 8, seed=0)
    roles = token_roles(tokens, task)
    assert ((tokens == ACCEPT).sum(1) == 1).all() and not (tokens == REJECT).any()
    assert (roles == 2).sum().item() == 8


def test_reflective_sft_mix(trained_tiny):
    paths, _ = trained_tiny
    model = load(paths["base"])
    task = model.tsds_config.task
    data = reflective_sft_data(model, task, 512, seed=0, first_right_fraction=0.5)
    first_right = (data[:, task.prompt_len + task.answer_len] == ACCEPT).float().mean().item()
    assert first_right == pytest.approx(0.5, abs=0.01)
    # every trajectory ends with ACCEPT of the right answer or at the budget
    assert ((data == ACCEPT).sum(1) == 1).all()


def test_existing_output_needs_resume(tmp_path):
    cfg = preset_config("tiny", "pretrain", steps=2, eval_every=100, log_every=1)
    train_stage(cfg, tmp_path / "a", quiet=True)
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "a"), "--steps", "2",
                 "--quiet"]) == 2


def test_cli_errors(tmp_path, capsys):
    assert main(["sft", "--preset", "tiny", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "y"), "--weighting", "odd"]) == 2
    assert main(["pretrain", "--preset", "tiny", "--out", str(tmp_path / "z"), "--resume"]) == 2
    assert main(["pretrain", "--preset", "huge", "--out", str(tmp_path)]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_trainer_role_grad_norms_logged(tmp_path):
    cfg = preset_config("tiny", "pretrain", steps=2, log_every=1, eval_every=100)
    run_stage(Stage.build(cfg), tmp_path)
    row = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert row["grad_norm_sample"] > 0 and row["grad_norm_decision"] > 0


def test_bf16_autocast_trains_close_to_float32(trained_tiny, tmp_path):
    """On the same batch (pretraining and SFT are teacher-forced on seeded data), the first step's
    gradient norm under bf16 autocast is within 5% of float32's; RL, whose episodes are sampled under
    autocast and so differ from float32's, trains with finite losses; weights stay float32."""
    from safetensors.torch import load_file

    paths, _ = trained_tiny
    for stage, init in (("pretrain", []), ("sft", ["--init", str(paths["base"])])):
        for name, extra in (("fp32", []), ("bf16", ["--autocast", "bf16"])):
            assert main([stage, "--preset", "tiny", *init, "--steps", "1", "--log-every", "1", "--quiet",
                         "--out", str(tmp_path / stage / name), *extra]) == 0
        rows = {n: json.loads((tmp_path / stage / n / "log.jsonl").read_text().splitlines()[0])
                for n in ("fp32", "bf16")}
        assert rows["bf16"]["grad_norm"] != rows["fp32"]["grad_norm"]  # autocast was on
        assert rows["bf16"]["grad_norm"] == pytest.approx(rows["fp32"]["grad_norm"], rel=0.05), stage
    assert main(["rl", "--preset", "tiny", "--init", str(paths["sft"]), "--steps", "2", "--log-every", "1",
                 "--quiet", "--out", str(tmp_path / "rl"), "--autocast", "bf16"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert len(rows) >= 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    w = load_file(str(tmp_path / "rl" / "checkpoint" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in w.values())


def test_paper_preset_is_valid():
    cfg = preset_config("paper", "pretrain")
    assert cfg.model_config().n_layers == 5 and cfg.task().width == 6
    with pytest.raises(ValueError, match="autocast"):
        preset_config("tiny", "rl", autocast="fp8")
