"""HuggingFace GPT-2- and Llama-style models built offline, and the public API for your own traces."""

import os

import numpy as np
import pytest
import torch
from tl_reference import assert_attribution_matches, assert_grids_match

from tsds_interp.forward import refusal
from tsds_interp.gradient_split import role_gradients
from tsds_interp.hf import boot, save_random
from tsds_interp.patching import activation_patch
from tsds_interp.traces import ds_counts, patch, role_attribution, traces

os.environ.setdefault("TQDM_DISABLE", "1")
WORDS = [*"0123456789", "*", "=", "ACCEPT", "REJECT"]
ACCEPT, REJECT = 4 + WORDS.index("ACCEPT"), 4 + WORDS.index("REJECT")
# "<bos> 3 * 4 = 21 REJECT 12 ACCEPT <eos>" and "<bos> 2 * 3 = 6 ACCEPT <eos> <pad> <pad> <pad>"
TOKENS = torch.tensor([[1, 7, 14, 8, 15, 6, 5, REJECT, 5, 6, ACCEPT, 2],
                       [1, 6, 14, 7, 15, 10, ACCEPT, 2, 0, 0, 0, 0]])
ROLES = [["prompt"] * 5 + ["sample"] * 2 + ["decision"] + ["sample"] * 2 + ["decision", "end"],
         ["prompt"] * 5 + ["sample", "decision", "end", "pad", "pad", "pad", "pad"]]

@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_model(request, tmp_path_factory):
    folder = save_random(request.param, tmp_path_factory.mktemp(request.param), WORDS)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    return request.param, boot(folder)


def metric(logits):
    return (logits[:, -1, ACCEPT] - logits[:, -1, REJECT]).mean()


def contrast():
    clean = TOKENS[:, :8].clone()
    corrupted = clean.clone()
    corrupted[:, 3] = 9
    return clean, corrupted


def test_the_fast_path_takes_gpt2_and_refuses_llama(hf_model, caplog):
    """GPT-2's layout (LayerNorm, learned positions, gelu_new, Conv1D-stored weights) runs on the
    own weights, equal to the hooked forward; Llama's (RMSNorm, rotary, grouped-query, gated MLP) is
    refused and takes the hooked path; each says so in the log."""
    import logging

    from tsds_interp.forward import OwnWeights

    name, model = hf_model
    clean, _ = contrast()
    with torch.no_grad():
        reference = model(clean)
    if name == "gpt2":
        assert refusal(model) is None
        with torch.no_grad():
            torch.testing.assert_close(OwnWeights(model).logits(clean), reference, rtol=0, atol=1e-5)
    else:
        assert "normalization_type" in refusal(model) or "architecture" in refusal(model)
    with caplog.at_level(logging.DEBUG, logger="tsds_interp"):
        activation_patch(model, *contrast(), metric, "head_pos")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("head_pos patching: ")]
    assert said and ("own-weights" in said[0]) == (name == "gpt2")


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
