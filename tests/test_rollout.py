import pytest
import torch

from tsds_interp.rollout import ACCEPTED, INVALID, NOT_REACHED, REJECTED, rollout
from tsds_interp.task import DECISION, END, PAD, SAMPLE, build_trajectories, sample_questions, token_roles


@pytest.fixture(scope="module")
def questions(random_model):
    return sample_questions(random_model.tsds_config.task, "train", 24, seed=3)


@pytest.mark.parametrize("temp,dtemp", [(0.0, 0.0), (1.0, 1.0), (1.3, 0.5)])
def test_kv_cache_matches_uncached_reference(random_model, questions, temp, dtemp):
    kw = dict(temperature=temp, decision_temperature=dtemp, seed=7)
    cached = rollout(random_model, questions, **kw)
    ref = rollout(random_model, questions, cached=False, **kw)
    assert torch.equal(cached.tokens, ref.tokens)
    assert torch.allclose(cached.logprobs, ref.logprobs, atol=1e-5)


def test_kv_cache_matches_on_long_episodes(trained_tiny):
    from tsds_interp.model import load

    paths, _ = trained_tiny
    model = load(paths["sft"])
    q = sample_questions(model.tsds_config.task, "train", 64, seed=5)
    cached = rollout(model, q, temperature=1.0, seed=2)
    ref = rollout(model, q, temperature=1.0, seed=2, cached=False)
    assert torch.equal(cached.tokens, ref.tokens)
    assert (cached.n_attempts > 1).any()  # the comparison covered multi-attempt episodes


def test_same_seed_same_tokens_any_batching(random_model, questions):
    a = rollout(random_model, questions, seed=11)
    b = rollout(random_model, questions, seed=11, batch_size=5)
    c = rollout(random_model, questions[:7], seed=11)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.tokens[:7], c.tokens)


def test_random_model_garbage_never_crashes(random_model):
    q = sample_questions(random_model.tsds_config.task, "train", 200, seed=0)
    r = rollout(random_model, q, temperature=2.0, seed=0)
    task = random_model.tsds_config.task
    assert r.tokens.shape == (200, task.max_len)
    assert r.malformed.any()
    assert not r.final_correct[r.malformed].any()
    assert ((r.roles == END).sum(1) == 1).all()
    assert torch.equal(r.roles, token_roles(r.tokens, task))


def test_rollout_bookkeeping_on_a_scripted_model(tiny_cfg):
    """A model whose weights make it copy a fixed script: check every field."""
    task = tiny_cfg.task
    q = sample_questions(task, "train", 16, seed=1)
    r = rollout(_ScriptedPolicy(task), q, task=task, temperature=0.0, cached=False)
    # first candidate wrong (product + 1), rejected; second right, accepted
    assert (r.values[:, 0] == q.a * q.b + 1).all() and (r.values[:, 1] == q.a * q.b).all()
    assert (r.decisions[:, 0] == REJECTED).all() and (r.decisions[:, 1] == ACCEPTED).all()
    assert r.correct[:, 1].all() and not r.correct[:, 0].any()
    assert (r.n_attempts == 2).all() and r.final_correct.all() and (r.reward == 1).all()
    assert (r.roles == DECISION).sum(1).tolist() == [2] * 16
    assert (r.roles == SAMPLE).sum(1).tolist() == [2 * task.answer_len] * 16
    assert (r.logprobs[r.roles == SAMPLE] == 0).all()  # one-hot script: log 1 = 0


def test_budget_caps_attempts(tiny_cfg):
    task = tiny_cfg.task
    q = sample_questions(task, "train", 8, seed=1)
    r = rollout(_ScriptedPolicy(task, always_reject=True), q, task=task, temperature=0.0, budget=3, cached=False)
    assert (r.n_attempts == 3).all()
    assert (r.decisions == REJECTED).all()
    # at the budget the last candidate is final even though it was rejected
    assert (r.values[:, 2] == q.a * q.b).all() and r.final_correct.all()


def test_invalid_decision_ends_episode(tiny_cfg):
    task = tiny_cfg.task
    q = sample_questions(task, "train", 8, seed=1)
    r = rollout(_ScriptedPolicy(task, decision_token=PAD), q, task=task, temperature=0.0, cached=False)
    assert (r.decisions[:, 0] == INVALID).all() and (r.decisions[:, 1] == NOT_REACHED).all()
    assert r.malformed.all() and not r.final_correct.any()


def test_empty_and_bad_arguments(random_model, questions):
    with pytest.raises(ValueError, match="no questions"):
        rollout(random_model, questions[:0])
    with pytest.raises(ValueError, match=r"temperature must be a finite number in \[0, 100\], got -1"):
        rollout(random_model, questions, temperature=-1)
    with pytest.raises(ValueError, match="batch_size must be an integer in"):
        rollout(random_model, questions, batch_size=0)
    wide = type(questions)(questions.a * 1000, questions.b)
    with pytest.raises(ValueError, match="operands a must be in"):
        rollout(random_model, wide)
    with pytest.raises(ValueError, match="integer tensor"):
        rollout(random_model, type(questions)(questions.a.float(), questions.b))


class _ScriptedPolicy(torch.nn.Module):
    """Stands in for a model in ``rollout(cached=False)``-style calls: returns one-hot logits that
    write (product + 1) REJECT, then product ACCEPT (or always REJECT / a bad decision token)."""
    def __init__(self, task, always_reject=False, decision_token=None):
        super().__init__()
        self.task, self.always_reject, self.decision_token = task, always_reject, decision_token
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        from tsds_interp.model import ModelConfig
        self.tsds_config = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_mlp=4, task=task)

    def forward(self, tokens):
        from tsds_interp.task import ACCEPT, REJECT
        task = self.task
        n, T = tokens.shape
        P = task.prompt_len
        a = (tokens[:, 1 : 1 + task.width] * 10 ** torch.arange(task.width - 1, -1, -1)).sum(1)
        b = (tokens[:, 2 + task.width : 2 + 2 * task.width] * 10 ** torch.arange(task.width - 1, -1, -1)).sum(1)
        dec = [torch.full((n,), REJECT), torch.full((n,), REJECT if self.always_reject else ACCEPT)]
        dec += [torch.full((n,), REJECT)] * task.budget
        script = build_trajectories(a, b, [a * b + 1, a * b] + [a * b] * task.budget,
                                    dec[: max(2, task.budget + 2)], _task_with_budget(task, 2 + task.budget))
        if self.decision_token is not None:
            script[:, P + task.answer_len] = self.decision_token
        nxt = script[:, 1 : T + 1]
        logits = torch.full((n, T, 17), -1e4)
        logits.scatter_(2, nxt[:, :, None], 0.0)
        return logits


class _SoftScript(torch.nn.Module):
    """Known soft logits for every attempt of a one-shot episode: each candidate digit of the product at
    0 and every other token at -4; each decision 50/50 between ACCEPT and REJECT. Counts its forward calls."""
    def __init__(self, task):
        super().__init__()
        from tsds_interp.model import ModelConfig
        self.task, self.calls = task, 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.tsds_config = ModelConfig(n_layers=1, d_model=4, n_heads=1, d_mlp=4, task=task)

    def forward(self, tokens):
        from tsds_interp.task import ACCEPT, REJECT, answer_tokens
        self.calls += 1
        task, (n, T) = self.task, tokens.shape
        P, L, W = task.prompt_len, task.answer_len, task.width
        powers = 10 ** torch.arange(W - 1, -1, -1)
        a, b = ((tokens[:, lo : lo + W] * powers).sum(1) for lo in (1, 2 + W))
        answer = answer_tokens(a * b, task)
        logits = torch.full((n, T, 17), -4.0)
        for pos in range(P - 1, T):  # the logits at pos choose the token at pos + 1
            offset = (pos + 1 - P) % task.attempt_len
            if offset < L:
                logits[:, pos].scatter_(1, answer[:, offset, None], 0.0)
            else:
                logits[:, pos] = -1e4
                logits[:, pos, [ACCEPT, REJECT]] = 0.0
        return logits


def test_rollouts_on_known_logits_use_each_temperature_where_it_belongs(tiny_cfg):
    """Candidates at ``temperature``, decisions at ``decision_temperature``; log-probs at temperature 1
    of exactly the drawn tokens; one forward per drawn token; a rejected last attempt ends the episode
    all the same; a non-digit candidate token (``*`` included) ends it malformed."""
    import numpy as np

    from tsds_interp.task import EOS, parse_candidate
    task = tiny_cfg.task
    P, L, K = task.prompt_len, task.answer_len, task.budget
    q = sample_questions(task, "train", 300, seed=7)
    product = q.a * q.b
    near = float(np.log(1 / (1 + 16 * np.exp(-4.0))))  # the scripted digit's log-probability
    model = _SoftScript(task)

    r = rollout(model, q, task=task, temperature=0.0, decision_temperature=1.0, seed=1, cached=False)
    assert model.calls == K * task.attempt_len  # prefill, then one forward per later token, none wasted
    made = r.decisions != NOT_REACHED
    assert (r.values[made] == product[:, None].expand(-1, K)[made]).all() and (r.values[~made] == -1).all()
    assert 0.4 < (r.decisions[:, 0] == ACCEPTED).float().mean() < 0.6 and not r.malformed.any()
    assert torch.equal(r.n_attempts, 1 + (r.decisions[:, 0] == REJECTED).long())
    assert r.final_correct.all()  # a rejected last candidate is final, and it is right
    ends = P + r.n_attempts * task.attempt_len  # one past each episode's last decision
    assert (r.tokens[torch.arange(300), ends] == EOS).all()
    assert torch.allclose(r.logprobs[r.roles == SAMPLE], torch.tensor(near))
    assert torch.allclose(r.logprobs[r.roles == DECISION], torch.tensor(float(np.log(0.5))))

    r = rollout(model, q, task=task, temperature=1.0, decision_temperature=0.0, seed=1, cached=False)
    first = r.tokens[:, P : P + L]
    bad = (first > 9).any(1)
    assert (first == 10).any() and 0.05 < bad.float().mean() < 0.5  # some candidates hold '*' or other tokens
    unwritten = (first[:, 0] == PAD) | (first[:, 0] == EOS)  # an episode that ended before its first candidate
    assert torch.equal(r.malformed, bad) and torch.equal(r.n_attempts, (~unwritten).long()) and unwritten.any()
    assert (r.decisions[~bad, 0] == ACCEPTED).all() and (r.decisions[bad, 0] == NOT_REACHED).all()
    expected = torch.where(unwritten, -1, parse_candidate(first, task))
    assert torch.equal(r.values[:, 0], expected) and (r.values[:, 1] == -1).all()
    assert torch.equal(r.final_correct, (r.values[:, 0] == product) & ~bad) and r.final_correct.any()
    assert (r.decisions[:, 1:] == NOT_REACHED).all()


def _task_with_budget(task, k):
    from tsds_interp.task import TaskConfig
    return TaskConfig(**{**task.to_dict(), "budget": k})


def test_cache_on_real_episodes_matches_the_full_forward(trained_tiny):
    """A trained model's long, well-formed episodes (ACCEPT and REJECT both taken, decision
    temperature apart from the sampling one): the cached decode gives the uncached tokens and
    log-probs, and the cache's logits equal a full forward at every position."""
    from tsds_interp.forward import KVCache, use_own_weights
    from tsds_interp.model import load

    paths, _ = trained_tiny
    model = load(paths["sft"])
    assert use_own_weights(model, "rollout")
    task = model.tsds_config.task
    q = sample_questions(task, "test", 256, seed=4)
    kw = dict(task=task, temperature=1.3, decision_temperature=2.0, seed=11)
    cached, uncached = rollout(model, q, cached=True, **kw), rollout(model, q, cached=False, **kw)
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.logprobs, uncached.logprobs, rtol=0, atol=1e-4)
    assert (cached.n_attempts > 1).any() and not cached.malformed.all()  # the episodes the test needs
    assert (cached.decisions == ACCEPTED).any() and (cached.decisions == REJECTED).any()
    tokens = cached.tokens[:32]
    cache = KVCache(model, len(tokens), task.max_len)
    with torch.no_grad():
        full = model(tokens)
        got = [cache.prefill(tokens[:, : task.prompt_len])]
        got += [cache.step(tokens[:, t]) for t in range(task.prompt_len, task.max_len - 1)]
    torch.testing.assert_close(torch.stack(got, 1), full[:, task.prompt_len - 1 : -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["rl", "steps_rl"])
def test_rollouts_in_chunks_with_progress_are_the_same_episodes(name):
    """``rollout_with_progress`` (used by verify for its progress bar and estimate) gives the episodes of
    one ``rollout`` call: equal tokens and outcomes, log-probabilities to batch rounding."""
    import dataclasses

    from tsds_interp.model import config_of, load
    from tsds_interp.rollout import rollout_with_progress

    model = load(name)
    q = sample_questions(config_of(model).task, "test", 100, seed=1)
    whole = rollout(model, q, temperature=1.0, seed=3)
    chunked = rollout_with_progress(model, q, chunk=32, temperature=1.0, seed=3)
    for f in dataclasses.fields(whole):
        a, b = getattr(whole, f.name), getattr(chunked, f.name)
        if f.name == "logprobs":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a, b), f.name
        else:
            assert a == b, f.name


def test_progress_counts_units_and_warns_once_when_the_first_item_predicts_a_long_run(monkeypatch):
    """A clock that makes the first item (1 of 10 units) take 360 s: the estimate is 360 * 10 / 1 s =
    1.0 h, a warning past an hour's threshold and none at it; the bar gets the total, the label, the
    unit and each item's units; ``quiet`` turns it off."""
    import importlib
    import warnings

    module = importlib.import_module("tsds_interp.rollout")  # the module (the package exports the function)
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.updates = kw, []
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            self.updates.append(n)

    monkeypatch.setattr(module, "tqdm", Bar)
    monkeypatch.setattr(module.time, "perf_counter", lambda: next(clock))
    sizes = {"a": 1, "b": 4, "c": 5}
    for threshold, warns in ((3599.0, True), (3600.0, False)):
        clock = iter([0.0, 360.0, 900.0, 1000.0])
        monkeypatch.setattr(module, "LONG_RUN_S", threshold)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert list(module.progress(list(sizes), "sweep", "head", size=sizes.get)) == ["a", "b", "c"]
        said = [w for w in caught if issubclass(w.category, module.LongRunWarning)]
        assert [str(w.message) for w in said] == (["sweep: 10 heads will take about 1.0 h at this rate; Ctrl-C "
                                                   "stops the run, a smaller size shortens it"] if warns else [])
        assert all(w.filename == __file__ for w in said)  # the caller's line
    assert bars[-1].kw == dict(total=10, desc="sweep", unit="head", disable=None) and bars[-1].updates == [1, 4, 5]
    clock = iter([0.0, 1.0, 2.0, 3.0])
    assert list(module.progress(["x", "y"], "items", quiet=True, total=7)) == ["x", "y"]
    assert bars[-1].kw == dict(total=7, desc="items", unit="it", disable=True) and bars[-1].updates == [1, 1]


def test_sampling_draws_each_token_by_the_inverse_cdf_of_the_tempered_distribution():
    """Logits (0, log 3): at temperature 2 the probabilities are 1 : sqrt 3, so a uniform below
    1 / (1 + sqrt 3) = 0.366 draws token 0; at temperature 1 the cut is at 0.25; temperature 0 is greedy."""
    import math

    from tsds_interp.rollout import sample_tokens
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]]).repeat(4, 1)
    u = torch.tensor([0.2, 0.3, 0.4, 0.99])
    assert sample_tokens(logits, 2.0, u).tolist() == [0, 0, 1, 1]
    assert sample_tokens(logits, 1.0, u).tolist() == [0, 1, 1, 1]
    assert sample_tokens(logits, 0.0, u).tolist() == [1, 1, 1, 1]
    assert sample_tokens(logits, 1.0, torch.ones(4)).tolist() == [1] * 4  # never past the last token


def test_decision_temperature_and_batch_size_are_checked_at_their_bounds(random_model, questions):
    q = questions[:2]
    for value in (0, 100):
        rollout(random_model, q, decision_temperature=value)
    for value, shown in ((-0.5, "-0.5"), (100.5, "100.5"), (float("nan"), "nan")):
        with pytest.raises(ValueError) as err:
            rollout(random_model, q, decision_temperature=value)
        assert str(err.value) == f"decision_temperature must be a finite number in [0, 100], got {shown}"
    rollout(random_model, q, batch_size=1)
    for value in (0, 2**24 + 1, 1.5):
        with pytest.raises(ValueError) as err:
            rollout(random_model, q, batch_size=value)
        assert str(err.value) == f"batch_size must be an integer in [1, 16777216], got {value}"
    with pytest.raises(ValueError) as err:
        rollout(random_model, [1, 2])
    assert str(err.value) == ("questions must be a tsds_interp.task.Questions (e.g. from sample_questions), got list")


def test_an_all_malformed_rollout_warns_at_the_callers_line(tiny_cfg):
    import warnings

    from tsds_interp.rollout import MalformedWarning
    task = tiny_cfg.task
    policy = _ScriptedPolicy(task, decision_token=PAD)
    for n, warns in ((2, True), (1, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rollout(policy, sample_questions(task, "train", n, seed=1), task=task, temperature=0.0, cached=False)
        said = [w for w in caught if issubclass(w.category, MalformedWarning)]
        assert len(said) == warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rollout(policy, sample_questions(task, "train", 3, seed=1), task=task, temperature=0.0, cached=False)
    (w,) = [w for w in caught if issubclass(w.category, MalformedWarning)]
    assert str(w.message) == ("all 3 episodes are malformed (the model never wrote a well-formed candidate and "
                              "decision): is it trained on this task format?")
    assert w.filename == __file__  # the line that called rollout, not the library's
