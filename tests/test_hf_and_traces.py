"""HuggingFace GPT-2-, Llama-, Qwen2- and Mistral-style models built offline, and the public API for your own traces."""

import os

import numpy as np
import pytest
import torch
from tl_reference import assert_attribution_matches, assert_grids_match

from tsds_interp.forward import refusal
from tsds_interp.gradient_split import role_gradients
from tsds_interp.hf import boot, save_random
from tsds_interp.patching import activation_patch
from tsds_interp.traces import ds_counts, generate, patch, role_attribution, traces

os.environ.setdefault("TQDM_DISABLE", "1")
WORDS = [*"0123456789", "*", "=", "ACCEPT", "REJECT"]
ACCEPT, REJECT = 4 + WORDS.index("ACCEPT"), 4 + WORDS.index("REJECT")
# "<bos> 3 * 4 = 21 REJECT 12 ACCEPT <eos>" and "<bos> 2 * 3 = 6 ACCEPT <eos> <pad> <pad> <pad>"
TOKENS = torch.tensor([[1, 7, 14, 8, 15, 6, 5, REJECT, 5, 6, ACCEPT, 2],
                       [1, 6, 14, 7, 15, 10, ACCEPT, 2, 0, 0, 0, 0]])
ROLES = [["prompt"] * 5 + ["sample"] * 2 + ["decision"] + ["sample"] * 2 + ["decision", "end"],
         ["prompt"] * 5 + ["sample", "decision", "end", "pad", "pad", "pad", "pad"]]

@pytest.fixture(scope="module", params=["gpt2", "llama", "qwen2", "mistral"])
def hf_model(request, tmp_path_factory):
    folder = save_random(request.param, tmp_path_factory.mktemp(request.param), WORDS)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    model = boot(folder)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, so each one counts,
        for p in model.parameters():  # and weights large enough for effects well above float noise
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(4)
    return request.param, model


def metric(logits):
    return (logits[:, -1, ACCEPT] - logits[:, -1, REJECT]).mean()


def contrast():
    clean = TOKENS[:, :8].clone()
    corrupted = clean.clone()
    corrupted[:, 3] = 9
    return clean, corrupted


def test_the_fast_path_takes_every_hf_layout(hf_model, caplog):
    """GPT-2 (LayerNorm, learned positions, gelu_new, Conv1D-stored weights) and Llama, Qwen2 and
    Mistral (RMSNorm, rotary positions in halves, grouped-query attention, gated SiLU MLP; Qwen2's
    q/k/v biases) run on the own weights, equal to the hooked forward, and say so in the log."""
    import logging

    from tsds_interp.forward import OwnWeights

    name, model = hf_model
    clean, _ = contrast()
    assert refusal(model) is None
    with torch.no_grad():
        reference = model(clean)
        torch.testing.assert_close(OwnWeights(model).logits(clean), reference, rtol=0, atol=1e-5)
    with caplog.at_level(logging.DEBUG, logger="tsds_interp"):
        activation_patch(model, *contrast(), metric, "head_pos")
        generate(model, clean, 4, seed=0)
    for what in ("head_pos patching", "generate"):
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{what}: ")]
        assert said and all("own-weights" in x for x in said), (what, said)


def test_cached_generation_equals_uncached_and_a_full_forward(hf_model):
    """Generation with the key/value cache gives the tokens and log-probabilities of decoding
    through the hooked model, and each log-probability is the full forward's at that position."""
    _, model = hf_model
    prompts = TOKENS[:, :5].repeat(4, 1)
    cached, logp = generate(model, prompts, 24, temperature=1.0, seed=5)
    uncached, logp_ref = generate(model, prompts, 24, temperature=1.0, seed=5, cached=False)
    eos = model.tokenizer.eos_token_id
    lengths = (cached[:, 5:] != eos).sum(1)
    assert int(lengths.max()) >= 10, lengths  # long continuations: the cache is used far into the rows
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(logp, logp_ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        full = model(cached).log_softmax(-1)[:, 4:-1].gather(-1, cached[:, 5:, None])[..., 0]
    written = torch.cat([torch.ones(len(cached), 1, dtype=torch.bool), cached[:, 5:-1] != eos], 1)
    torch.testing.assert_close(logp[written], full[written], rtol=0, atol=1e-5)


def test_layouts_outside_the_allow_list_refuse_by_name(tmp_path):
    import transformers

    from tsds_interp.hf import word_tokenizer

    tokenizer = word_tokenizer(WORDS)
    size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, max_position_embeddings=64, vocab_size=len(tokenizer))
    cases = {
        "sliding_window=16": transformers.MistralForCausalLM(transformers.MistralConfig(**size, sliding_window=16)),
        "rope_type='dynamic'": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **size, rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
        "architecture='Gemma2ForCausalLM'": transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **size, head_dim=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    }
    for reason, hf_model in cases.items():
        folder = tmp_path / reason.split("=")[0]
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        assert reason in (refusal(boot(folder)) or ""), reason
    llama = boot(save_random("llama", tmp_path / "llama", WORDS))
    assert refusal(llama) is None
    rope = next(m for m in llama.original_model.modules() if "inv_freq" in m._buffers)
    rope.attention_scaling = 0.5  # a rotary embedding that rescales what it rotates
    assert "rope_type='default' rotary scaling is not implemented" in refusal(llama)
    gpt2 = boot(save_random("gpt2", tmp_path / "gpt2", WORDS))
    gpt2.train()  # GPT-2's dropout is active when training: not reproduced, so refused
    assert "pdrop" in refusal(gpt2)


def test_each_hf_setting_the_own_forward_does_not_reproduce_is_refused_by_name(tmp_path):
    """The model's own HuggingFace config is read at every call: each setting that would make the
    model compute something else turns the own-weights forward off with a reason naming it, and
    settings that change nothing (a window as long as the context, sliding attention switched off or
    on no layer, zero dropout) do not."""
    def said(model, **changes):
        config = model.original_model.config
        before = {k: getattr(config, k, None) for k in changes}
        for k, v in changes.items():
            setattr(config, k, v)
        try:
            return refusal(model)
        finally:
            for k, v in before.items():
                setattr(config, k, v)

    llama, qwen2, gpt2 = (boot(save_random(n, tmp_path / n, WORDS)) for n in ("llama", "qwen2", "gpt2"))
    assert refusal(llama) is None and refusal(qwen2) is None and refusal(gpt2) is None
    assert said(llama, pretraining_tp=2) == "pretraining_tp=2 is not implemented by the own-weights forward"
    assert said(llama, head_dim=16) == "head_dim=16 differs from d_head=8"
    assert said(llama, rms_norm_eps=1e-3) == "the norms' eps 0.001 differs from the config's 1e-06"
    assert said(gpt2, layer_norm_epsilon=1e-3) == "the norms' eps 0.001 differs from the config's 1e-05"
    assert said(llama, hidden_act="relu") == "hidden_act='relu' differs from the bridge's act_fn='silu'"
    assert said(gpt2, activation_function="relu") == "hidden_act='relu' differs from the bridge's act_fn='gelu_new'"
    window = "sliding_window=63 is shorter than the context (64)"
    assert said(llama, sliding_window=63) == window and said(llama, sliding_window=64) is None
    assert said(qwen2, sliding_window=63) is None  # use_sliding_window=False
    assert said(qwen2, sliding_window=63, use_sliding_window=True) is None  # no layer slides
    assert said(qwen2, sliding_window=63, use_sliding_window=True,
                layer_types=["full_attention", "sliding_attention"]) == window
    llama.train()
    try:
        assert said(llama) is None  # training mode with every dropout at 0
        assert said(llama, attention_dropout=0.1) == "attention_dropout=0.1 is active in training mode"
    finally:
        llama.eval()
    assert said(llama, attention_dropout=0.1) is None  # dropout is off in evaluation mode


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_activation_patching_of_hf_models_equals_transformer_lens(hf_model, direction):
    _, model = hf_model
    assert_grids_match(model, *contrast(), metric, direction)


def test_attribution_patching_of_hf_models_equals_transformer_lens(hf_model):
    _, model = hf_model
    clean, corrupted = contrast()
    checked = assert_attribution_matches(model, clean, corrupted, metric,
                                         lambda lg: lg[0, -1, ACCEPT] - lg[0, -1, REJECT])
    assert checked == model.cfg.n_layers * clean.shape[1] * (model.cfg.n_heads + 1)


def test_role_split_gradients_of_hf_models_add_up(hf_model):
    """The sample and decision parts of the loss's gradient add up to its whole gradient."""
    _, model = hf_model
    batch = traces(TOKENS, ROLES)
    for objective in ("sft_token_mean", "sft_role_balanced"):
        grads, acts, _ = role_gradients(model, batch, objective)
        for name, full in grads["full"].items():
            assert torch.allclose(grads["sample"][name] + grads["decision"][name], full, atol=1e-6), name
        for name, full in acts["full"].items():
            assert torch.allclose(acts["sample"][name] + acts["decision"][name], full, atol=1e-6), name
    table, summary = role_attribution(model, TOKENS, ROLES, objectives=("sft_token_mean", "sft_role_balanced"))
    assert list(summary.objective) == ["sft_token_mean", "sft_role_balanced"]
    assert (summary.norm_sample > 0).all() and (summary.norm_decision > 0).all()
    assert set(table.kind) == {"total", "param", "activation"}
    assert table.query("kind == 'total' and part == 'decision'").n_tokens.iloc[0] == 3


def test_patch_returns_a_tidy_table(hf_model):
    _, model = hf_model
    clean, corrupted = contrast()
    df = patch(model, clean, corrupted, metric, "head_pos")
    cfg = model.cfg
    assert len(df) == cfg.n_layers * clean.shape[1] * cfg.n_heads
    assert set(df.columns) >= {"layer", "pos", "head", "effect", "metric_after", "base_metric", "method", "direction"}
    with torch.no_grad():
        base = float(metric(model(corrupted)))
    assert df.base_metric.eq(base).all()
    assert np.allclose(df.effect, df.metric_after - base, atol=1e-6)


def test_ds_counts_of_hand_made_traces():
    df = ds_counts(TOKENS, ROLES, ACCEPT, REJECT, correct=[[False, True], [True]]).set_index("metric")
    assert df.loc["p_s", ["k", "n"]].tolist() == [2, 3]
    assert df.loc["p_s_first", ["k", "n"]].tolist() == [1, 2]
    assert df.loc["p_d_given_c", ["k", "n"]].tolist() == [2, 2]
    assert df.loc["p_d_given_w", ["k", "n"]].tolist() == [1, 1]
    assert df.loc["other_decision", "k"] == 0
    assert df.loc["p_s", "lo"] < 2 / 3 < df.loc["p_s", "hi"]
    by_checker = ds_counts(TOKENS, ROLES, ACCEPT, REJECT, correct=lambda row, cand: cand in ([5, 6], [10]))
    assert by_checker.equals(ds_counts(TOKENS, ROLES, ACCEPT, REJECT, correct=[[False, True], [True]]))


def test_bad_traces_are_clear_errors():
    with pytest.raises(ValueError, match="unknown role 'answer'"):
        traces(TOKENS, [["answer"] * 12] * 2)
    with pytest.raises(ValueError, match="same shape"):
        traces(TOKENS[:, :5], ROLES)
    with pytest.raises(ValueError, match="2 attempts but 1"):
        ds_counts(TOKENS, ROLES, ACCEPT, REJECT, correct=[[True], [True]])
    with pytest.raises(ValueError, match="no sample or decision"):
        traces(TOKENS, [["prompt"] * 12] * 2)


def test_training_forward_of_hf_models_has_the_hooked_gradients(hf_model):
    """The own-weights training forward of every HuggingFace layout gives the hooked forward's
    parameter gradients (1e-5), and an optimizer step on the model is seen by it (live weights)."""
    from tsds_interp.forward import OwnForward, fast_forward

    _, model = hf_model
    own = fast_forward(model, "training")
    assert isinstance(own, OwnForward)
    tokens = TOKENS[:, :10]
    grads = []
    for forward in (model, own):
        model.zero_grad(set_to_none=True)
        forward(tokens).log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0] and grads[0].keys() == grads[1].keys()  # the same parameters reached
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    weight = model.state_dict(keep_vars=True)["blocks.0.mlp.out.weight"]
    with torch.no_grad():
        before = own(tokens)
        weight.mul_(1.5)
        try:
            torch.testing.assert_close(own(tokens), model(tokens), rtol=0, atol=1e-5)
            assert not torch.allclose(own(tokens), before, atol=1e-4)
        finally:
            weight.div_(1.5)
