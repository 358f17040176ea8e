import pandas as pd
import pytest
import torch

from tsds_interp.cli.attribution import main
from tsds_interp.gradient_split import (
    OBJECTIVES,
    Trajectories,
    attribute,
    attribute_all,
    objective_terms,
    parameter_groups,
    role_gradients,
    summarize,
)
from tsds_interp.model import ModelConfig, build_model, save
from tsds_interp.task import ACCEPT, DECISION, REJECT, build_trajectories, sample_questions, token_roles


@pytest.fixture(scope="module")
def models(tiny_cfg):
    policy = build_model(ModelConfig(**{**tiny_cfg.to_dict(), "seed": 5}))
    ref = build_model(ModelConfig(**{**tiny_cfg.to_dict(), "seed": 6}))
    return policy, ref


@pytest.fixture(scope="module")
def batch(tiny_cfg):
    """Two-attempt trajectories with random candidates and decisions, rewards in groups of 4."""
    task = tiny_cfg.task
    g = torch.Generator().manual_seed(0)
    q = sample_questions(task, "train", 16, seed=1)
    cands = [torch.randint(0, 10 ** (2 * task.width), (16,), generator=g) for _ in range(2)]
    cands[0][:5] = q.a[:5] * q.b[:5]
    first = torch.where(torch.rand(16, generator=g) < 0.5, ACCEPT, REJECT)
    tokens = build_trajectories(q.a, q.b, cands, [first, torch.full((16,), ACCEPT)], task)
    reward = torch.rand(16, generator=g).round()
    return Trajectories(tokens, token_roles(tokens, task), reward, group=4)


def _no_hooks(model):
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_role_gradients_are_complete(models, batch, objective):
    policy, ref = models
    grads, acts, _ = role_gradients(policy, batch, objective, ref=ref)
    for name, full in grads["full"].items():
        split = grads["sample"][name] + grads["decision"][name]
        assert torch.allclose(split, full, atol=1e-6, rtol=1e-4), name
    for name, full in acts["full"].items():
        assert torch.allclose(acts["sample"][name] + acts["decision"][name], full, atol=1e-7, rtol=1e-4)
    assert all(float(g.abs().sum()) > 0 for g in (grads["sample"]["head._original_component.weight"],
                                                  grads["decision"]["head._original_component.weight"]))
    assert _no_hooks(policy) and all(p.grad is None for p in policy.parameters())


def test_head_slices_cover_each_parameter_once(models, batch):
    policy, _ = models
    grads, _, _ = role_gradients(policy, batch, "sft_token_mean")
    groups = parameter_groups(policy)
    covered = {}
    for _, _, _, name, sl in groups:
        covered[name] = covered.get(name, 0) + sl(grads["full"][name]).numel()
    assert covered == {n: p.numel() for n, p in policy.named_parameters()}
    df = attribute(policy, batch, "sft_token_mean")
    for part in ("sample", "decision", "full"):
        rows = df[(df.part == part)]
        total = rows[rows.kind == "total"].grad_norm.item()
        assert rows[rows.kind == "param"].grad_norm.pow(2).sum() == pytest.approx(total**2, rel=1e-9)
    # a layer's W_Q gradient is its heads' slices stacked, and each slice is W_Q[l, h]'s gradient
    name = next(n for n in grads["full"] if n.endswith("attn._original_component.q._original_component.weight")
                and n.startswith("layers.1."))
    slicers = [sl for _, _, _, n, sl in groups if n == name]
    assert torch.equal(torch.cat([sl(grads["full"][name]) for sl in slicers]), grads["full"][name])
    weight = dict(policy.named_parameters())[name]
    assert torch.allclose(slicers[2](weight).T, policy.W_Q[1, 2])
    o_name = name.replace(".q.", ".o.")
    o_slicer = [sl for _, _, _, n, sl in groups if n == o_name][2]
    assert torch.allclose(o_slicer(dict(policy.named_parameters())[o_name]).T, policy.W_O[1, 2])


def test_hook_gradients_equal_autograd(models, batch):
    """Each activation, made a leaf by a forward hook (one at a time, so no path is cut), gets the
    same gradient from autograd as from the backward hooks."""
    policy, _ = models
    _, acts, _ = role_gradients(policy, batch, "sft_role_balanced", decision_share=0.3)
    for name in ("blocks.0.hook_mlp_out", "blocks.0.attn.hook_z", "blocks.1.attn.hook_z"):
        seen = []

        def make_leaf(act, hook, seen=seen):
            seen.append(act.detach().clone().requires_grad_(True))
            return seen[-1]

        with policy.hooks(fwd_hooks=[(name, make_leaf)]):
            terms = objective_terms(policy, batch, "sft_role_balanced", decision_share=0.3)
        (auto,) = torch.autograd.grad(terms.role_loss(DECISION), seen)
        assert acts["decision"][name].shape == auto.shape
        assert torch.allclose(acts["decision"][name], auto, atol=1e-9, rtol=1e-5)
        assert float(auto.abs().max()) > 0


def test_hooks_removed_when_objective_raises(models, batch):
    policy, _ = models
    no_reward = Trajectories(batch.tokens, batch.roles)
    with pytest.raises(ValueError, match="needs rewards"):
        role_gradients(policy, no_reward, "surrogate")
    with pytest.raises(ValueError, match="reference model"):
        role_gradients(policy, batch, "kl")
    assert _no_hooks(policy)


def test_summary_matches_direct_computation(models, batch):
    policy, ref = models
    grads, _, _ = role_gradients(policy, batch, "kl", ref=ref)
    flat = {k: torch.cat([g.flatten() for g in v.values()]).double() for k, v in grads.items()}
    row = summarize(attribute(policy, batch, "kl", ref=ref)).iloc[0]
    s, d = flat["sample"].norm(), flat["decision"].norm()
    assert row.norm_sample == pytest.approx(float(s), rel=1e-6)
    assert row.cosine == pytest.approx(float(flat["sample"] @ flat["decision"] / (s * d)), abs=1e-5)
    n_d, n_s = int((batch.roles == 2).sum()), int((batch.roles == 1).sum())
    assert row.imbalance_index == pytest.approx(float(d / (s + d)) / (n_d / (n_s + n_d)), rel=1e-6)


def test_role_balanced_puts_the_asked_share_on_decisions(models, batch):
    """With one token per role weighted share / (1 - share), the loss split is exact."""
    policy, _ = models
    _, _, terms = role_gradients(policy, batch, "sft_role_balanced", decision_share=0.25)
    w = terms.weights
    assert float((w * (batch.roles == 2)).sum()) == pytest.approx(0.25)
    df = attribute_all(policy, {"sft_data": batch, "rollouts": batch}, ref=None)
    assert "kl" not in set(df.objective)


def test_cli_writes_table_and_figures(trained_tiny, tmp_path, capsys):
    paths, _ = trained_tiny
    out = tmp_path / "attr"
    assert main(["--checkpoint", str(paths["rl"]), "--ref", str(paths["sft"]), "--questions", "6",
                 "--group", "4", "--out", str(out)]) == 0
    table = pd.read_csv(out / "summary.csv")
    assert list(table.objective) == list(OBJECTIVES)
    assert (table.decision_token_share > 0).all() and (table.imbalance_index > 0).all()
    assert (out / "gradient_mass.png").stat().st_size > 0 and (out / "head_decision_share.png").is_file()
    assert "imbalance_index" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--checkpoint", "no_such_model"], "no_such_model"),
    (["--group", "1"], "--group"),
])
def test_cli_errors_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_on_a_model_folder_without_ref_skips_kl(trained_tiny, tmp_path, capsys):
    paths, _ = trained_tiny
    assert main(["--checkpoint", str(paths["sft"]), "--questions", "4", "--group", "2",
                 "--out", str(tmp_path / "o")]) == 0
    assert "KL skipped" in capsys.readouterr().out
    assert "kl" not in set(pd.read_csv(tmp_path / "o" / "summary.csv").objective)


def test_cli_on_a_model_that_writes_no_answers_exits_2(models, tmp_path, capsys):
    policy, _ = models
    save(policy, tmp_path / "m")
    assert main(["--checkpoint", str(tmp_path / "m"), "--questions", "2", "--group", "2",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "reflective" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
