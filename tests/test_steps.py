"""The step format: token layout, checker, episode driver, data, measures, patching, training."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from conftest import TINY_TASK

from tests.tl_reference import assert_grids_match
from tsds_interp.data import reflective_sft_data, solution_batch, verification_data
from tsds_interp.metrics import ds_metrics
from tsds_interp.model import ModelConfig, build_model, load
from tsds_interp.pairs import decision_pairs, sampling_pairs
from tsds_interp.rollout import ACCEPTED, REJECTED, StepRollouts, rollout, sample_steps
from tsds_interp.task import (
    ACCEPT,
    DECISION,
    END,
    EOS,
    PAD,
    PROMPT,
    REJECT,
    SAMPLE,
    States,
    TaskConfig,
    check_steps,
    corrupt_step_tokens,
    decode,
    n_calls,
    next_states,
    parse_states,
    sample_questions,
    solution_states,
    state_tokens,
    step_fields,
    token_roles,
    true_step_tokens,
)
from tsds_interp.train import Interrupted, preset_config, train_stage
from tsds_interp.verification import StepVerificationData, _step_verification_rows, verification_metrics

STEPS = TaskConfig(**{**TINY_TASK.to_dict(), "task_format": "steps"})
W3 = TaskConfig(width=3, budget=3, task_format="steps", train_cells=((2, 2), (3, 3)), ood_cells=())


def _states(x, y, r):
    return States(torch.tensor(x), torch.tensor(y), torch.tensor(r))


def test_layout_and_roles_of_a_worked_example():
    s = _states([12], [34], [0])
    assert decode(state_tokens(s, STEPS)[0]) == "<bos> 2 1 * 4 3 = 0 0 0 0"
    step = true_step_tokens(s, STEPS)
    assert decode(step[0]) == "4 0 3 8 4 0 0 8 4 0 0"  # u=4, y'=30, p=48, r'=48
    nxt = next_states(s, step, STEPS)
    assert (nxt.x.item(), nxt.y.item(), nxt.r.item()) == (12, 30, 48)
    step2 = true_step_tokens(nxt, STEPS)
    assert decode(step2[0]) == "3 0 0 0 6 3 0 8 0 4 0"  # u=3, y'=0, p=360, r'=408 = 12 * 34
    row = torch.cat([state_tokens(s, STEPS), step, torch.tensor([[ACCEPT, EOS]])], 1)
    assert row.shape[1] == STEPS.max_len == STEPS.prompt_len + STEPS.answer_len + 2
    roles = token_roles(row, STEPS)[0].tolist()
    assert roles == [PROMPT] * 11 + [SAMPLE] * 11 + [DECISION, END]
    got = parse_states(state_tokens(s, STEPS), STEPS)
    assert (got.x.item(), got.y.item(), got.r.item()) == (12, 34, 0)
    f = step_fields(step, STEPS)
    assert [int(f[k]) for k in "uypr"] == [4, 30, 48, 48]


def test_zero_digits_of_y_are_skipped_and_chains_reach_the_product():
    q = sample_questions(W3, "train", 300, seed=0)
    s = States(q.a.clone(), q.b.clone(), torch.zeros_like(q.a))
    for call in range(W3.max_calls):
        live = s.y > 0
        expect = solution_states(q.a[live], q.b[live], W3, torch.full((int(live.sum()),), call))
        assert torch.equal(expect.y, s.y[live]) and torch.equal(expect.r, s.r[live])
        nxt = next_states(s[live], true_step_tokens(s[live], W3), W3)
        s.y[live], s.r[live] = nxt.y, nxt.r
    assert (s.y == 0).all() and torch.equal(s.r, q.a * q.b)
    assert n_calls(torch.tensor([101, 100, 7]), W3).tolist() == [2, 1, 1]


def test_checker_on_right_wrong_and_malformed_steps():
    s = _states([12, 12, 12], [34, 34, 34], [0, 0, 0])
    truth = true_step_tokens(s, STEPS)
    wrong = truth.clone()
    wrong[1, -4] = 9  # r' digit
    bad = truth.clone()
    bad[2, 3] = ACCEPT
    steps = torch.stack([truth[0], wrong[1], bad[2]])
    assert check_steps(s, steps, STEPS).tolist() == [True, False, False]
    corrupted = corrupt_step_tokens(truth.repeat(50, 1), STEPS, np.random.default_rng(0))
    assert not check_steps(s[torch.zeros(150, dtype=torch.long)], corrupted, STEPS).any()
    assert ((corrupted != truth.repeat(50, 1)).sum(1) == 1).all()  # exactly one digit changed
    with pytest.raises(ValueError, match="task_format='steps'"):
        true_step_tokens(s, TaskConfig())
    with pytest.raises(ValueError, match="y = 0"):
        true_step_tokens(_states([1], [0], [0]), STEPS)
    with pytest.raises(ValueError, match="does not fit"):
        state_tokens(_states([100], [1], [0]), STEPS)


class _StepScript(torch.nn.Module):
    """One-hot logits that write a scripted attempt from whatever state is in the prompt.

    ``mode``: "right" (true step, ACCEPT); "first_call_wrong" (at r = 0 the true step with r' off in
    its lowest digit, REJECT; elsewhere true + ACCEPT); "stuck" (y' = y, never finishes, ACCEPT);
    "bad_decision" (true step, PAD); "star" (the true step with ``*``, the first non-digit token, as
    its first digit)."""
    def __init__(self, task, mode):
        super().__init__()
        self.task, self.mode = task, mode
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tsds_config = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_mlp=4, task=task)

    def forward(self, tokens):
        task, P = self.task, self.task.prompt_len
        n, T = tokens.shape
        s = parse_states(tokens[:, :P], task)
        step = true_step_tokens(s, task)
        dec = torch.full((n,), ACCEPT)
        if self.mode == "first_call_wrong":
            first = s.r == 0
            step[first, 1 + 3 * task.width] = (step[first, 1 + 3 * task.width] + 1) % 10
            dec[first] = REJECT
        elif self.mode == "stuck":
            step[:, 1 : 1 + task.width] = tokens[:, 2 + task.width : 2 + 2 * task.width]
        elif self.mode == "bad_decision":
            dec[:] = PAD
        elif self.mode == "star":
            step[:, 0] = 10
        script = torch.cat([tokens[:, :P], step, dec[:, None], torch.full((n, 1), EOS)], 1)
        logits = torch.full((n, T, 17), -1e4)
        logits.scatter_(2, script[:, 1 : T + 1, None], 0.0)
        return logits


def test_episode_driver_on_scripted_policies():
    q = sample_questions(W3, "train", 40, seed=2)
    calls = n_calls(q.b, W3)
    r = rollout(_StepScript(W3, "right"), q, task=W3, temperature=0.0, cached=False)
    assert isinstance(r, StepRollouts)
    assert r.final_correct.all() and torch.equal(r.final_value, q.a * q.b) and torch.equal(r.n_calls, calls)
    assert torch.equal(r.n_attempts, calls) and r.step_correct.all() and (r.decisions == ACCEPTED).all()
    assert torch.equal(r.roles, token_roles(r.tokens, W3)) and (r.roles == DECISION).sum(1).eq(1).all()

    r = rollout(_StepScript(W3, "first_call_wrong"), q, task=W3, temperature=0.0, cached=False)
    first = r.call == 0
    assert (r.attempt[first].view(-1, W3.budget) == torch.arange(W3.budget)).all()  # resampled up to the budget
    assert not r.step_correct[first].any() and (r.decisions[first] == REJECTED).all()
    assert r.taken[first].view(-1, W3.budget)[:, -1].all()  # at the budget the last step is taken anyway
    assert r.step_correct[~first].all() and (r.decisions[~first] == ACCEPTED).all()  # right for their own state
    assert not r.final_correct.any() and torch.equal(r.n_calls, calls)
    assert torch.equal(r.n_attempts, calls + W3.budget - 1)
    m = ds_metrics(r).query("cell == 'all'").set_index("metric").value
    first_calls, later_calls = len(q), int(calls.sum()) - len(q)
    assert m["p_s_first"] == pytest.approx(later_calls / (first_calls + later_calls))
    assert m["p_d_given_w"] == 1.0 and m["p_d_given_c"] == 1.0 and m["episode_accuracy"] == 0.0
    assert m["p_s_first@call1"] == 0.0 and m["mean_attempts"] == pytest.approx(
        (first_calls * W3.budget + later_calls) / (first_calls + later_calls))

    r = rollout(_StepScript(W3, "stuck"), q, task=W3, temperature=0.0, cached=False)
    assert (r.n_calls == W3.max_calls).all() and (r.final_value == -1).all() and not r.malformed.any()

    r = rollout(_StepScript(W3, "bad_decision"), q, task=W3, temperature=0.0, cached=False)
    assert r.malformed.all() and (r.n_attempts == 1).all() and not r.final_correct.any()
    assert (r.decisions == -1).all()

    r = rollout(_StepScript(W3, "star"), q, task=W3, temperature=0.0, cached=False)
    assert decode(r.tokens[0, W3.prompt_len : W3.prompt_len + 2]) == "* <eos>"  # ends at the malformed token
    assert r.malformed.all() and (r.n_attempts == 1).all() and (r.n_calls == 1).all()
    assert not r.step_correct.any() and (r.decisions == -2).all() and not r.taken.any()
    assert (r.final_value == -1).all() and not r.final_correct.any()


def test_step_rollouts_have_their_documented_dtypes_and_concatenate():
    q = sample_questions(W3, "train", 12, seed=5)
    r = rollout(_StepScript(W3, "first_call_wrong"), q, task=W3, temperature=0.0, cached=False)
    kinds = {"a": torch.long, "b": torch.long, "final_value": torch.long, "final_correct": torch.bool,
             "n_calls": torch.long, "malformed": torch.bool, "episode": torch.long, "call": torch.long,
             "attempt": torch.long, "tokens": torch.long, "roles": torch.long, "logprobs": torch.float32,
             "step_correct": torch.bool, "decisions": torch.long, "taken": torch.bool}
    assert {f.name for f in dataclasses.fields(StepRollouts)} == {*kinds, "budget"}
    assert {k: getattr(r, k).dtype for k in kinds} == kinds and r.budget == W3.budget
    for parts in ([r], [r, r]):
        both = StepRollouts.cat(parts)
        assert len(both) == len(r) * len(parts) and both.budget == W3.budget
        assert torch.equal(both.episode, torch.cat([r.episode + i * len(r) for i in range(len(parts))]))
        assert torch.equal(both.tokens, torch.cat([r.tokens] * len(parts)))


def test_step_rollouts_and_sampling_log_the_forward_they_take(caplog):
    """The own-weights KV cache where it is exact; the hooked forward once a user's hook is attached."""
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, task=STEPS))
    q = sample_questions(STEPS, "train", 4, seed=0)
    s = solution_states(q.a, q.b, STEPS, torch.zeros(4, dtype=torch.long))

    def said():
        with caplog.at_level(logging.DEBUG, logger="tsds_interp"):
            rollout(model, q, seed=0)
            sample_steps(model, s, STEPS, seed=0)
        out = {m.split(": ")[0]: m.split(": ")[1] for m in (r.getMessage() for r in caplog.records)
               if m.startswith(("step rollout: ", "step sampling: "))}
        caplog.clear()
        return out

    assert said() == {"step rollout": "own-weights forward", "step sampling": "own-weights forward"}
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: a)]):
        hooked = said()
    assert set(hooked) == {"step rollout", "step sampling"}
    assert all(v.startswith("hooked forward (") for v in hooked.values()), hooked


@pytest.mark.parametrize("temp,dtemp", [(0.0, 0.0), (1.0, 1.0), (1.5, 0.7)])
def test_cached_equals_uncached_on_trained_step_episodes(trained_steps, temp, dtemp):
    model = load(trained_steps[0]["sft"])
    q = sample_questions(STEPS, "train", 96, seed=4)
    kw = dict(temperature=temp, decision_temperature=dtemp, seed=3)
    cached, ref = rollout(model, q, **kw), rollout(model, q, cached=False, **kw)
    assert torch.equal(cached.tokens, ref.tokens) and torch.equal(cached.episode, ref.episode)
    assert torch.allclose(cached.logprobs, ref.logprobs, atol=1e-5)


def test_same_seed_same_episodes_in_any_batch(trained_steps):
    model = load(trained_steps[0]["sft"])
    q = sample_questions(STEPS, "train", 30, seed=8)
    a = rollout(model, q, seed=5)
    b = rollout(model, q, seed=5, batch_size=7)
    c = rollout(model, q[:10], seed=5)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.final_value[:10], c.final_value)
    assert torch.equal(a.tokens[a.episode < 10], c.tokens)


def test_training_data_is_labelled_by_the_checker(trained_steps):
    model = load(trained_steps[0]["base"])
    P, L = STEPS.prompt_len, STEPS.answer_len
    for data in (solution_batch(STEPS, 64, 0), reflective_sft_data(model, STEPS, 256, 0, mix="natural",
                                                                     temperature=2.0),
                 verification_data(model, STEPS, 64, 0)):
        s = parse_states(data[:, :P], STEPS)
        right = check_steps(s, data[:, P : P + L], STEPS)
        assert torch.equal(data[:, P + L] == ACCEPT, right)
        assert ((data[:, P + L] == ACCEPT) | (data[:, P + L] == REJECT)).all() and (data[:, -1] == EOS).all()
    v = verification_data(model, STEPS, 64, 0)
    assert torch.equal(v[0::2, :P], v[1::2, :P]) and (v[0::2, P + L] == ACCEPT).all()


def test_step_verification_rows_match_hand_computation():
    # 3 states x 2 samples. State 0: right (p_acc .9) and wrong (.2); state 1: two wrong (.6, .1);
    # state 2: two right (.8, .7). Logit gaps: truth 2, 1, 0; samples as below.
    v = StepVerificationData(
        cells=np.array(["1x1"] * 3), greedy_correct=np.array([True, False, True]),
        sample_correct=np.array([[True, False], [False, False], [True, True]]),
        sample_wellformed=np.ones((3, 2), bool),
        gap_truth=np.array([2.0, 1.0, 0.0]), p_acc_truth=np.array([0.9, 0.8, 0.7]),
        gap_sample=np.array([[2.0, -1.0], [1.0, 3.0], [0.0, 0.0]]),
        p_acc_sample=np.array([[0.9, 0.2], [0.6, 0.1], [0.8, 0.7]]),
        logprob_truth=np.array([-1.0, -2.0, -3.0]), logprob_sample=np.array([[-1.0, -4.0], [-1.0, -3.0],
                                                                              [-3.0, -3.0]]),
        corruption_gap=np.array([1.0, 0.0, -1.0]))
    rows = {r["metric"]: r for r in _step_verification_rows(v, np.ones(3, bool), "1x1", np.random.default_rng(0), 200)}
    assert rows["within_auc@1"]["value"] == pytest.approx((1.0 + 0.25) / 2)  # state 0: 1; state 1: ties .5, loss 0
    assert rows["logit_gap@1"]["value"] == pytest.approx((3.0 + (1.0 - 2.0)) / 2)
    assert rows["e_plus@1"]["value"] == pytest.approx((0.2 + 0.6 + 0.1) / 3)
    assert rows["e_minus@1"]["value"] == pytest.approx((0.1 + 0.2 + 0.3) / 3)
    assert rows["sample_accuracy"]["value"] == pytest.approx(3 / 6)
    assert rows["slip_share"]["value"] == pytest.approx(1 / 3)  # only state 0's wrong sample has greedy right
    assert rows["own_logprob_auc"]["value"] == pytest.approx((1.0 + 0.5) / 2)  # state 1: one above, one below
    assert rows["corruption_auc"]["value"] == pytest.approx(0.5)
    assert rows["within_auc@1"]["n"] == 2 and rows["e_plus@1"]["n"] == 3


def test_verification_metrics_and_verify_cli_on_a_step_model(trained_steps, tmp_path, capsys):
    from tsds_interp.cli.verify import main

    paths, _ = trained_steps
    model = load(paths["rl"])
    df = verification_metrics(model, 60, samples=2, n_boot=50)
    need = {"within_auc@1", "e_plus@1", "e_minus@1", "episode_accuracy", "episode_accuracy_no_reflection"}
    assert need <= set(df.metric) and {"hard", "all"} <= set(df.cell)
    acc = df.query("cell == 'all' and metric == 'episode_accuracy'").value.item()
    assert acc == ds_metrics(rollout(model, sample_questions(STEPS, "test", 60, seed=10_007), temperature=1.0,
                                     seed=2)).query("cell == 'all' and metric == 'episode_accuracy'").value.item()
    assert main(["--checkpoint", str(paths["rl"]), "--questions", "30", "--samples", "2", "--bootstrap", "20",
                 "--out", str(tmp_path / "v")]) == 0
    assert "e_plus@1" in capsys.readouterr().out
    assert (tmp_path / "v" / "verification.png").is_file()


def test_step_patching_equals_transformer_lens(trained_steps):
    model = load(trained_steps[0]["sft"])
    for pairs in (decision_pairs(model, STEPS, 6, seed=1), sampling_pairs(STEPS, 6, seed=1)):
        assert pairs.clean.shape == pairs.corrupted.shape
        assert torch.equal(pairs.clean[:, : STEPS.prompt_len], pairs.corrupted[:, : STEPS.prompt_len]) == (
            pairs.function == "decision")
        for direction in ("denoise", "noise"):
            assert_grids_match(model, pairs.clean, pairs.corrupted, pairs.metric, direction)
    pairs = decision_pairs(model, STEPS, 6, seed=1)
    s = parse_states(pairs.clean[:, : STEPS.prompt_len], STEPS)
    P, L = STEPS.prompt_len, STEPS.answer_len
    assert check_steps(s, pairs.clean[:, P : P + L], STEPS).all()
    assert not check_steps(s, pairs.corrupted[:, P : P + L], STEPS).any()


def test_step_pretraining_resume_is_bit_exact(tmp_path):
    cfg = preset_config("steps_tiny", "pretrain", steps=10, ckpt_every=100, eval_every=100, log_every=5)
    straight = load(train_stage(cfg, tmp_path / "a", quiet=True))
    with pytest.raises(Interrupted):
        train_stage(cfg, tmp_path / "b", quiet=True, stop_after=4)
    resumed = load(train_stage(cfg, tmp_path / "b", quiet=True, resume=True))
    assert all(torch.equal(v, w) for v, w in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_step_rl_resume_is_bit_exact_with_masked_rejected_steps(trained_steps, tmp_path):
    paths, _ = trained_steps
    cfg = preset_config("steps_tiny", "rl", steps=4, ckpt_every=100, eval_every=100, log_every=2,
                        rl_rejected_samples="mask")
    straight = load(train_stage(cfg, tmp_path / "a", init=paths["sft"], quiet=True))
    with pytest.raises(Interrupted):
        train_stage(cfg, tmp_path / "b", init=paths["sft"], quiet=True, stop_after=2)
    resumed = load(train_stage(cfg, tmp_path / "b", init=paths["sft"], quiet=True, resume=True))
    assert all(torch.equal(v, w) for v, w in zip(straight.state_dict().values(), resumed.state_dict().values()))


def test_sample_steps_decodes_every_position_alike_cached_or_not():
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, task=STEPS))
    s = solution_states(*(lambda q: (q.a, q.b))(sample_questions(STEPS, "train", 20, seed=1)), STEPS,
                        torch.zeros(20, dtype=torch.long))
    a = sample_steps(model, s, STEPS, 1.0, seed=4)
    b = sample_steps(model, s, STEPS, 1.0, seed=4, cached=False)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-5)


class _SoftStepScript(torch.nn.Module):
    """Known soft logits for one attempt from the state in the prompt: each step digit's true token at
    0 and every other token at -4; the decision 50/50 between ACCEPT and REJECT; then EOS for sure.
    Counts its forward calls."""
    def __init__(self, task):
        super().__init__()
        self.task, self.calls = task, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tsds_config = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_mlp=4, task=task)

    def script(self, tokens):
        P = self.task.prompt_len
        return torch.cat([tokens[:, :P], true_step_tokens(parse_states(tokens[:, :P], self.task), self.task)], 1)

    def forward(self, tokens):
        self.calls += 1
        task, (n, T) = self.task, tokens.shape
        P, L = task.prompt_len, task.answer_len
        logits = torch.full((n, T, 17), -4.0)
        logits.scatter_(2, self.script(tokens)[:, 1 : T + 1, None], 0.0)
        if T > P + L - 1:
            logits[:, P + L - 1] = -1e4
            logits[:, P + L - 1, [ACCEPT, REJECT]] = 0.0
        if T > P + L:
            logits[:, P + L] = -1e4
            logits[:, P + L, EOS] = 0.0
        return logits


def test_step_sampling_on_known_logits_uses_each_temperature_where_it_belongs():
    """Steps at ``temperature``, decisions at ``decision_temperature``, log-probs at temperature 1 of
    exactly the drawn tokens, one forward per token, the same draws in any batch size."""
    q = sample_questions(STEPS, "train", 300, seed=6)
    s = solution_states(q.a, q.b, STEPS, torch.zeros(300, dtype=torch.long))
    model = _SoftStepScript(STEPS)
    P, L = STEPS.prompt_len, STEPS.answer_len
    truth = true_step_tokens(s, STEPS)

    tokens, logprobs = sample_steps(model, s, STEPS, temperature=0.0, decision_temperature=1.0, seed=2,
                                    batch_size=128, cached=False)
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert model.calls == 3 * STEPS.attempt_len  # three batches, one forward per drawn token
    assert torch.equal(tokens[:, P : P + L], truth)  # greedy steps
    accept = (tokens[:, P + L] == ACCEPT).float().mean()
    assert 0.4 < accept < 0.6 and ((tokens[:, P + L] == ACCEPT) | (tokens[:, P + L] == REJECT)).all()
    assert (tokens[:, P + L + 1] == EOS).all()
    near = 1 / (1 + 16 * np.exp(-4.0))  # the true digit's probability at temperature 1
    torch.testing.assert_close(logprobs[:, P : P + L], torch.full((300, L), float(np.log(near))))
    torch.testing.assert_close(logprobs[:, P + L], torch.full((300,), float(np.log(0.5))))
    assert logprobs[:, :P].eq(0).all() and logprobs[:, P + L + 1 :].abs().max() < 1e-6

    again = sample_steps(model, s, STEPS, temperature=0.0, decision_temperature=1.0, seed=2, cached=False)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], logprobs)  # batch size changes nothing

    tokens, logprobs = sample_steps(model, s, STEPS, temperature=1.0, decision_temperature=0.0, seed=2,
                                    cached=False)
    formed = (tokens[:, P : P + L] <= 9).all(1)  # a non-digit ends the attempt: EOS after it, then PAD
    assert 50 < formed.sum() < 250
    assert (tokens[formed, P + L] == ACCEPT).all()  # greedy decision (a tie goes to the first, ACCEPT)
    wrong = tokens[formed, P : P + L] != truth[formed]
    assert 0.1 < wrong.float().mean() < 0.4
    expected = torch.where(wrong, float(np.log(np.exp(-4.0) * near)), float(np.log(near)))
    torch.testing.assert_close(logprobs[formed, P : P + L], expected)


def test_step_attribution_gives_each_attempt_its_episodes_advantage(trained_steps):
    from tsds_interp.gradient_split import Trajectories, objective_terms
    from tsds_interp.objectives import advantages

    model = load(trained_steps[0]["sft"])
    q = sample_questions(STEPS, "train", 8, seed=6).repeat_interleave(4)
    r = rollout(model, q, temperature=1.5, seed=1)
    batch = Trajectories.from_rollouts(r, group=4)
    assert torch.equal(batch.episode, r.episode) and len(batch.reward) == len(q) < len(batch.tokens)
    terms = objective_terms(model, batch, "surrogate")
    adv = advantages(r.reward, 4)[r.episode]
    counted = (r.roles == SAMPLE) | (r.roles == DECISION)
    # at the current weights the surrogate per token is -A (ratio 1), so each row carries its episode's advantage
    assert torch.allclose(terms.values.detach(), (-adv[:, None] * counted).float())
    parts = terms.role_loss(SAMPLE) + terms.role_loss(DECISION)
    assert torch.allclose(parts, terms.loss)


def test_step_probe_rows_are_same_state_truth_and_own_wrong_steps(trained_steps):
    from tsds_interp.probe import probe_rows

    model = load(trained_steps[0]["base"])
    rows = probe_rows(model, STEPS, "train", 128, samples=4, temperature=2.0)
    P, L = STEPS.prompt_len, STEPS.answer_len
    s = parse_states(rows.tokens[:, :P], STEPS)
    assert torch.equal(check_steps(s, rows.tokens[:, P : P + L], STEPS), rows.correct)
    for qi in rows.question.unique():
        sel = rows.question == qi
        assert rows.correct[sel].sum() == 1 and (rows.tokens[sel, :P] == rows.tokens[sel][0, :P]).all()


def test_corruptions_change_one_digit_in_each_field_at_its_documented_rate_and_places():
    """u and y' are hit 10% of the time each, p and r' 40% each; a hit lands on one of a field's
    digit places (for p and r': the value's digits and one above, within the field) and is another digit."""
    W = STEPS.width
    s = _states([12], [34], [0])
    truth = true_step_tokens(s, STEPS)
    n = 4000
    corrupted = corrupt_step_tokens(truth.repeat(n, 1), STEPS, np.random.default_rng(1))
    rows, pos = (corrupted != truth).nonzero(as_tuple=True)
    assert torch.equal(rows, torch.arange(n)) and ((corrupted >= 0) & (corrupted <= 9)).all()
    fields = step_fields(truth, STEPS)
    places = {"u": [0], "y": list(range(1, 1 + W))}
    for name, start in (("p", 1 + W), ("r", 1 + 3 * W)):
        places[name] = list(range(start, start + min(2 * W, len(str(int(fields[name][0]))) + 1)))
    for name, rate in (("u", 0.1), ("y", 0.1), ("p", 0.4), ("r", 0.4)):
        hit = torch.isin(pos, torch.tensor(places[name]))
        assert abs(hit.float().mean().item() - rate) < 0.03, name
        assert set(pos[hit].tolist()) == set(places[name]), name  # every place is reached
    assert torch.isin(pos, torch.tensor(sum(places.values(), []))).all()  # and no other
