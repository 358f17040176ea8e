"""The verification measure on scripted decision policies, the SFT options that feed it, and its CLI."""

import numpy as np
import pytest
import torch

from tsds_interp.cli.verify import main
from tsds_interp.data import reflective_sft_data, verification_data
from tsds_interp.model import load
from tsds_interp.objectives import sft_terms
from tsds_interp.task import (
    ACCEPT,
    DECISION,
    REJECT,
    SAMPLE,
    Questions,
    TaskConfig,
    build_trajectories,
    check,
    parse_candidate,
    rejected_candidate_tokens,
    token_roles,
)
from tsds_interp.verification import score_candidates, verification_metrics, verification_table

TASK = TaskConfig(width=2, budget=2, train_cells=((1, 1), (2, 2)), ood_cells=())


def scripted(score):
    """A decision policy given as ``score(a, b, candidate) -> ACCEPT-REJECT logit``, read off the
    tokens the measure teacher-forces (prompt first, candidate last)."""
    def scorer(tokens):
        w = TASK.width

        def digits(t):
            return (t * 10 ** torch.arange(w - 1, -1, -1)).sum(1)
        a, b = digits(tokens[:, 1 : 1 + w]), digits(tokens[:, 2 + w : 2 + 2 * w])
        cand = parse_candidate(tokens[:, -TASK.answer_len :], TASK)
        gap = torch.tensor([float(score(x, y, c)) for x, y, c in zip(a.tolist(), b.tolist(), cand.tolist())])
        return gap, torch.sigmoid(gap)
    return scorer


def _table(questions, greedy, sampled, score, n_boot=200):
    v = score_candidates(questions, torch.tensor(greedy), torch.tensor(sampled), TASK, scripted(score))
    return verification_table(v, hard=("2x2",), n_boot=n_boot).set_index(["cell", "metric"])


def _random_case(seed=0, n=60, samples=6):
    rng = np.random.default_rng(seed)
    a, b = torch.tensor(rng.integers(10, 100, n)), torch.tensor(rng.integers(10, 100, n))
    truth = a * b
    right = torch.tensor(rng.random((n, samples)) < 0.5)
    off = torch.tensor(rng.integers(1, 9, (n, samples)))
    sampled = torch.where(right, truth[:, None], truth[:, None] + off)
    return Questions(a, b), truth.tolist(), sampled.tolist()


def test_a_verifier_has_within_question_auc_one():
    q, greedy, sampled = _random_case()
    t = _table(q, greedy, sampled, lambda a, b, c: 2.0 if c == a * b else -2.0)["value"]
    for k in (1, 2):
        assert t["2x2", f"within_auc@{k}"] == 1.0
        assert t["2x2", f"logit_gap@{k}"] == pytest.approx(4.0)
    assert t["2x2", "between_auc"] == 1.0
    s = torch.sigmoid(torch.tensor(2.0)).item()
    assert t["2x2", "accept_gap"] == pytest.approx(2 * s - 1)
    assert t["2x2", "accept_gap_difficulty"] == pytest.approx(0.0, abs=1e-7)
    assert t["2x2", "accept_gap_within"] == pytest.approx(2 * s - 1)


def test_a_difficulty_predictor_has_auc_one_half_and_all_gap_difficulty():
    q, greedy, sampled = _random_case(1)
    t = _table(q, greedy, sampled, lambda a, b, c: ((a * b) % 7) - 3.0)["value"]
    for k in (1, 2):
        assert t["2x2", f"within_auc@{k}"] == 0.5
        assert t["2x2", f"logit_gap@{k}"] == 0.0
    assert t["2x2", "accept_gap_within"] == pytest.approx(0.0, abs=1e-7)
    assert t["2x2", "accept_gap"] == pytest.approx(t["2x2", "accept_gap_difficulty"])
    assert t["2x2", "accept_gap"] != 0


def test_a_mixture_matches_hand_computation():
    # question 1: 12*34 = 408, greedy right; question 2: 21*43 = 903, greedy wrong (900)
    q = Questions(torch.tensor([12, 21]), torch.tensor([34, 43]))
    sampled = [[408, 409, 410, 408], [900, 903, 903, 903]]
    table = {408: 1.0, 409: 0.0, 410: 2.0, 903: 3.0, 900: 1.0}
    t = _table(q, [408, 900], sampled, lambda a, b, c: table[c], n_boot=50)["value"]
    assert t["2x2", "within_auc@1"] == pytest.approx((0.5 + 1.0) / 2)  # q1: 1 > 0, 1 < 2; q2: 3 > 1
    assert t["2x2", "logit_gap@1"] == pytest.approx(((1 - 1.0) + (3 - 1)) / 2)
    assert t["2x2", "between_auc"] == pytest.approx(2.5 / 3)  # 1 vs {1}: tie; 3 vs {0, 2}: both above
    assert t["2x2", "within_auc@2"] == 0.0  # only q1 has two wrong samples: after 409 REJECT, 1 < 2

    def sig(x):
        return 1 / (1 + np.exp(-x))
    mc = (2 * sig(1) + 3 * sig(3)) / 5
    mw = (sig(0) + sig(2) + sig(1)) / 3
    mt = (2 * sig(1) + sig(3)) / 3
    assert t["2x2", "accept_gap"] == pytest.approx(mc - mw, abs=1e-6)
    assert t["2x2", "accept_gap_difficulty"] == pytest.approx(mc - mt, abs=1e-6)
    assert t["2x2", "accept_gap_within"] == pytest.approx(mt - mw, abs=1e-6)
    assert t["2x2", "slip_share"] == pytest.approx(2 / 3)  # q1's two wrong samples; greedy right there
    assert t["2x2", "greedy_accuracy"] == 0.5
    assert t["2x2", "sample_accuracy"] == pytest.approx(5 / 8)


def test_rejected_candidates_are_left_out_of_the_sft_loss_token_by_token():
    a, b = torch.tensor([3, 12]), torch.tensor([4, 34])
    tokens = build_trajectories(a, b, [torch.tensor([11, 408]), torch.tensor([12, 408])],
                                [torch.tensor([REJECT, ACCEPT]), torch.tensor([ACCEPT, ACCEPT])], TASK)
    roles = token_roles(tokens, TASK)
    skip = rejected_candidate_tokens(tokens, TASK)
    P, L = TASK.prompt_len, TASK.answer_len
    expected = torch.zeros_like(skip)
    expected[0, P : P + L] = True  # row 0 rejects its first candidate (11); row 1 accepts at once
    assert torch.equal(skip, expected)
    logp = -torch.rand(tokens.shape)
    terms = sft_terms(logp, roles, "token_mean", skip=skip)
    kept = ((roles == SAMPLE) | (roles == DECISION)) & ~skip
    assert torch.equal(terms.weights != 0, kept)
    assert terms.weights[kept].unique().tolist() == pytest.approx([1 / kept.sum().item()])
    assert terms.loss.item() == pytest.approx((-logp[kept]).mean().item())
    # the REJECT decision after the skipped candidate is still trained
    assert terms.weights[0, P + L] > 0 and tokens[0, P + L] == REJECT


def test_verification_rows_are_paired_and_labelled_by_the_checker(trained_tiny):
    paths, _ = trained_tiny
    model = load(paths["base"])
    task = model.tsds_config.task
    rows = verification_data(model, task, 64, seed=0)
    assert rows.shape == (128, task.max_len)
    P, L = task.prompt_len, task.answer_len
    assert torch.equal(rows[0::2, :P], rows[1::2, :P])  # same question twice
    a = (rows[:, 1 : 1 + task.width] * 10 ** torch.arange(task.width - 1, -1, -1)).sum(1)
    b = (rows[:, 2 + task.width : 2 + 2 * task.width] * 10 ** torch.arange(task.width - 1, -1, -1)).sum(1)
    right = check(a, b, rows[:, P : P + L], task)
    assert right[0::2].all() and not right[1::2].any()
    assert (rows[0::2, P + L] == ACCEPT).all() and (rows[1::2, P + L] == REJECT).all()


def test_natural_mix_keeps_every_usable_trajectory(trained_tiny):
    paths, _ = trained_tiny
    model = load(paths["base"])
    task = model.tsds_config.task
    natural = reflective_sft_data(model, task, 256, seed=0, mix="natural")
    fixed = reflective_sft_data(model, task, 256, seed=0, first_right_fraction=0.5)
    rows = {tuple(r) for r in natural.tolist()}
    assert len(rows) >= len({tuple(r) for r in fixed.tolist()})
    assert all(tuple(r) in rows for r in fixed.tolist())  # the fixed mix is a subsample of the same pool
    with pytest.raises(ValueError, match="mix"):
        reflective_sft_data(model, task, 8, seed=0, mix="odd")


def test_verification_metrics_on_a_model_and_cli(trained_tiny, tmp_path, capsys):
    paths, _ = trained_tiny
    df = verification_metrics(load(paths["sft"]), n_questions=48, samples=4, n_boot=50)
    assert {"within_auc@1", "between_auc", "accept_gap_within", "p_d_given_w@2", "slip_share", "corruption_auc",
            "own_logprob_auc"} <= set(df.metric)
    auc = df[df.metric.str.startswith("within_auc")].value.dropna()
    assert ((auc >= 0) & (auc <= 1)).all()
    parts = df.set_index(["cell", "metric"]).value["all"]
    assert parts["accept_gap"] == pytest.approx(parts["accept_gap_difficulty"] + parts["accept_gap_within"])
    out = tmp_path / "v"
    assert main(["--checkpoint", str(paths["sft"]), "--questions", "24", "--samples", "2",
                 "--bootstrap", "20", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"verification.csv", "verification.png", "run.json"}
    capsys.readouterr()
    ckpt = ["--checkpoint", str(paths["sft"])]
    for bad in ([*ckpt, "--questions", "0"], [*ckpt, "--temperature", "0"], [*ckpt, "--cells", "9x9"],
                ["--checkpoint", str(tmp_path / "none")]):
        assert main([*bad, "--out", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_sft_with_verification_options_trains_and_resumes_a_grown_model(trained_tiny, tmp_path):
    from tsds_interp.train import Interrupted, preset_config, train_stage

    paths, _ = trained_tiny
    cfg = preset_config("tiny", "sft", steps=4, sft_questions=64, verify_questions=32, sft_mix="natural",
                        rejected_samples="skip", add_layers=1, log_every=2, eval_every=100, ckpt_every=100)
    straight = load(train_stage(cfg, tmp_path / "a", init=paths["base"], quiet=True))
    assert straight.cfg.n_layers == load(paths["base"]).cfg.n_layers + 1
    with pytest.raises(Interrupted):
        train_stage(cfg, tmp_path / "b", init=paths["base"], quiet=True, stop_after=2)
    resumed = load(train_stage(cfg, tmp_path / "b", init=paths["base"], quiet=True, resume=True))
    assert all(torch.equal(v, w) for v, w in zip(straight.state_dict().values(), resumed.state_dict().values()))
    with pytest.raises(ValueError, match="rejected_samples"):
        preset_config("tiny", "sft", rejected_samples="drop")
