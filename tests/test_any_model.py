"""The library on TransformerBridge models of many configurations: every patching grid in both
directions equals ``transformer_lens.patching``, attribution patching equals TransformerLens's
``attribution_patch``, cached rollouts equal uncached ones, and the own-weights fast path is taken
exactly where it reproduces the model (asserted per configuration) and never past a user's hook."""

import logging
import os

import pytest
import torch
import transformer_lens.model_bridge.sources  # noqa: F401
from tl_reference import assert_attribution_matches, assert_grids_match

from tsds_interp.bench import LAYOUT_MATRIX, matrix_model
from tsds_interp.forward import OwnForward, OwnWeights, fast_forward, refusal
from tsds_interp.patching import activation_patch, attribution_patch
from tsds_interp.rollout import rollout
from tsds_interp.task import VOCAB, TaskConfig, sample_questions

os.environ.setdefault("TQDM_DISABLE", "1")  # transformer_lens.patching's progress bars
TASK = TaskConfig(width=1, budget=2, train_cells=((1, 1),), ood_cells=())
BASE = dict(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=TASK.max_len, d_vocab=len(VOCAB), act_fn="gelu",
            seed=0, model_name="matrix")
# name: (config changes, None = the own-weights path is taken, else a word of the refusal)
REFUSED = {"score_soft_cap": "attn_scores_soft_cap", "logit_soft_cap": "output_logits_soft_cap",
           "bidirectional": "attention_dir", "solu": "act_fn"}
CONFIGS = {name: (changes, REFUSED.get(name)) for name, changes in LAYOUT_MATRIX.items()}
# Not in the matrix: parallel_attn_mlp=True, which TransformerLens 4.3's boot_native ignores (it builds
# the same sequential blocks, weights and logits as "native"), so it would test nothing; the own-weights
# forward refuses it all the same.


def build(name: str):
    return matrix_model(name, BASE)


def test_every_configuration_computes_something_different():
    tokens = pairs()[0]
    with torch.no_grad():
        logits = {name: build(name)(tokens) for name in CONFIGS}
    same = [(a, b) for i, a in enumerate(logits) for b in list(logits)[i + 1:]
            if torch.allclose(logits[a], logits[b], atol=1e-4)]
    assert not same


def pairs(T: int = 9):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, len(VOCAB), (2, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % len(VOCAB)
    return clean, corrupted


def metric(logits):
    return (logits[:, -1, 3] - logits[:, -1, 5]).mean()


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return request.param, build(request.param)


def test_the_fast_path_is_taken_exactly_where_it_is_exact(model):
    name, m = model
    m(pairs()[0])  # the bridge wires its own capture hooks on the first run: not a user's hook
    expected = CONFIGS[name][1]
    reason = refusal(m)
    assert reason is None if expected is None else expected in reason, reason


def test_each_fast_path_logs_the_path_it_takes(model, caplog):
    """Rollouts, head x position (exact and attribution) patching and the training forward say which forward ran: the
    own-weights one exactly where it is exact, the hooked one elsewhere (a silent fallback fails)."""
    name, m = model
    m(pairs()[0])
    want = "own-weights forward" if CONFIGS[name][1] is None else "hooked forward"
    with caplog.at_level(logging.DEBUG, logger="tsds_interp"):
        rollout(m, sample_questions(TASK, "train", 4, seed=0), task=TASK, seed=0)
        activation_patch(m, *pairs(), metric, "head_pos")
        attribution_patch(m, *pairs(), metric, "head_pos")
        attribution_patch(m, *pairs(), metric, "head")
        forward = fast_forward(m, "training")
    for what in ("rollout", "head_pos patching", "head_pos attribution patching", "head attribution patching",
                 "training"):
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what}: ")]
        assert said and all(want in x for x in said), (what, said)
    assert (forward is m) == (want == "hooked forward")


def test_a_native_model_with_rotary_scaling_is_refused_by_name():
    m = build("rotary")
    assert refusal(m) is None
    m.cfg.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    assert "rope_scaling" in refusal(m)  # refused by name (TransformerLens 4.3 has no such field: unknown)


def test_own_logits_equal_the_hooked_models_from_one_token_up(model):
    """One forward object on inputs of 1, then 3, then 9 tokens: position tables built for the
    first length and grown for the later ones give the hooked model's logits at every length."""
    name, m = model
    if CONFIGS[name][1] is not None:
        pytest.skip("the own-weights forward refuses this configuration")
    own, tokens = OwnWeights(m), pairs()[0]
    with torch.no_grad():
        for length in (1, 3, 9):
            torch.testing.assert_close(own.logits(tokens[:, :length]), m(tokens[:, :length]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_grid_equals_transformer_lens(model, direction):
    name, m = model
    assert_grids_match(m, *pairs(), metric, direction, skip=("mlp_out",) if name == "attn_only" else ())


def test_attribution_patching_equals_transformer_lens(model):
    name, m = model
    if name == "attn_only":
        pytest.skip("TransformerLens's attribution_patch needs an MLP in every block")
    clean, corrupted = pairs()
    checked = assert_attribution_matches(m, clean, corrupted, metric, lambda lg: lg[0, -1, 3] - lg[0, -1, 5])
    assert checked == m.cfg.n_layers * clean.shape[1] * (m.cfg.n_heads + 1)


def test_cached_rollouts_equal_uncached(model):
    _, m = model
    q = sample_questions(TASK, "train", 16, seed=0)
    kw = dict(task=TASK, temperature=1.0, seed=3)
    cached, uncached = rollout(m, q, cached=True, **kw), rollout(m, q, cached=False, **kw)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.allclose(cached.logprobs, uncached.logprobs, atol=1e-4)


def test_a_user_hook_changes_our_results_as_it_changes_transformer_lenss():
    m = build("native")
    clean, corrupted = pairs()
    before = activation_patch(m, clean, corrupted, metric, "head_pos")

    def zero_head_1(z, hook):
        z[:, :, 1] = 0
        return z
    m.add_hook("blocks.0.attn.hook_z", zero_head_1, is_permanent=True)
    try:
        assert refusal(m) == "hooks are attached to the model"
        assert_grids_match(m, clean, corrupted, metric)
        assert not torch.allclose(activation_patch(m, clean, corrupted, metric, "head_pos"), before, atol=1e-3)
        q = sample_questions(TASK, "train", 16, seed=0)
        kw = dict(task=TASK, temperature=1.0, seed=3)
        assert torch.equal(rollout(m, q, cached=True, **kw).tokens, rollout(m, q, cached=False, **kw).tokens)
        with torch.no_grad():
            assert torch.equal(OwnForward(m)(clean), m(clean))  # the training forward honours it too
    finally:
        m.reset_hooks(including_permanent=True)
    assert refusal(m) is None


def test_own_forward_gradients_equal_the_hooked_forwards(model):
    name, m = model
    tokens = pairs()[0]
    own = fast_forward(m)
    assert (own is m) == (CONFIGS[name][1] is not None)
    grads = []
    for forward in (m, own):
        m.zero_grad(set_to_none=True)
        forward(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean().backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters()})
    m.zero_grad(set_to_none=True)
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5), (name, k)


def test_memory_mb_bounds_the_prefix_reuse_path():
    from tsds_interp.patching import _bytes_per_variant, _PrefixReuse

    m = build("native")
    clean, corrupted = pairs()
    assert _PrefixReuse(m)._heads_per_batch(2, 9, 1e-6) == 1 and _PrefixReuse(m)._heads_per_batch(2, 9, 1e3) == 4
    two = 2 * _bytes_per_variant(m.cfg, 2, 9) / 2**20  # MiB for exactly two patched runs at once
    assert [_PrefixReuse(m)._heads_per_batch(2, 9, mb) for mb in (two, two * 0.999, two * 1.5)] == [2, 1, 3]
    small = activation_patch(m, clean, corrupted, metric, "head_pos", memory_mb=1e-6)
    assert torch.allclose(small, activation_patch(m, clean, corrupted, metric, "head_pos"), atol=1e-6)
