"""Circuits: node scores agree with the patching grids, naming rules, dissociation bookkeeping."""

import numpy as np
import pandas as pd
import pytest
import torch

from tsds_interp.circuits import (
    ablation_hooks,
    attribute_components,
    dissociation,
    matched_controls,
    name_circuits,
    node_scores,
    patch_components,
    shared_components,
)
from tsds_interp.components import Component, by_label, components
from tsds_interp.model import load
from tsds_interp.pairs import sampling_pairs
from tsds_interp.patching import activation_patch, attribution_patch
from tsds_interp.task import TaskConfig


def _no_hooks(model):
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


def test_component_scores_equal_the_patching_grids(random_model):
    pairs = sampling_pairs(random_model.tsds_config.task, 6, seed=0)
    act = patch_components(random_model, pairs)
    with torch.no_grad():
        base = float(pairs.metric(random_model(pairs.corrupted)))
    heads = activation_patch(random_model, pairs.clean, pairs.corrupted, pairs.metric, "head") - base
    attr = attribute_components(random_model, pairs)
    heads_attr = attribution_patch(random_model, pairs.clean, pairs.corrupted, pairs.metric, "head")
    mlp_attr = attribution_patch(random_model, pairs.clean, pairs.corrupted, pairs.metric, "mlp_out").sum(1)
    for layer in range(random_model.cfg.n_layers):
        for h in range(random_model.cfg.n_heads):
            assert act[f"L{layer}H{h}"] == pytest.approx(float(heads[layer, h]), abs=1e-4)
            assert attr[f"L{layer}H{h}"] == pytest.approx(float(heads_attr[layer, h]), abs=1e-5)
        assert attr[f"L{layer}.mlp"] == pytest.approx(float(mlp_attr[layer]), abs=1e-5)
    scores = node_scores(random_model, {"sampling": pairs, "decision": pairs}, questions=0)
    assert scores.score.between(0, 1).all()
    assert (scores.groupby(["function", "method"]).score.max() == 1).all()
    assert _no_hooks(random_model)


def test_circuits_are_named_by_specificity_and_shared_components_listed():
    rows = []
    table = {"A": (0.9, 0.1), "B": (0.6, 0.5), "C": (0.2, 0.8), "D": (0.7, 0.7), "E": (0.5, 0.0)}
    for comp, (dec, samp) in table.items():
        rows += [dict(component=comp, function="decision", method="m", score=dec),
                 dict(component=comp, function="sampling", method="m", score=samp)]
    scores = pd.DataFrame(rows)
    assert name_circuits(scores, k=3, margin=0.25) == {"decision": ["A", "E"], "sampling": ["C"]}
    assert name_circuits(scores, k=1, margin=0.25) == {"decision": ["A"], "sampling": ["C"]}
    assert shared_components(scores) == ["B", "D"]


def test_dissociation_rows_and_hygiene(random_model):
    circuits = {"decision": ["L1H0", "L0H2"], "sampling": ["L0.mlp"]}
    df = dissociation(random_model, circuits, "1x2,2x1", n_questions=32, samples=4, n_boot=50, controls=1)
    assert set(df.ablated) == {"none", "decision circuit", "sampling circuit", "decision top component",
                               "decision circuit control 0", "sampling circuit control 0",
                               "decision top component control 0"}
    assert set(df.ablation) == {"none", "mean"}
    none = df[df.ablated == "none"]
    assert (none.delta == 0).all()
    assert df[df.ablated == "decision circuit"].components.iloc[0] == "L1H0 L0H2"
    control = df[df.ablated == "decision circuit control 0"].components.iloc[0].split()
    assert not set(control) & {"L1H0", "L0H2", "L0.mlp"}
    assert len(control) == 2 and all("H" in c for c in control)  # two heads for two heads
    assert df[df.ablated == "sampling circuit control 0"].components.iloc[0] == "L1.mlp"  # the only other MLP
    assert _no_hooks(random_model)
    with pytest.raises(ValueError, match="unknown component"):
        by_label(random_model, ["L7H0"])


def test_controls_match_type_and_size_and_differ_between_seeds(random_model):
    comps = components(random_model)
    named = {"circuit": by_label(random_model, ["L0H1", "L1H2", "L0.mlp"])}
    pool = [c for c in comps if c.label not in {"L0H1", "L1H2", "L0.mlp"}]
    draws = [matched_controls(named, pool, 5, np.random.default_rng(seed)) for seed in (0, 1)]
    for sets in draws:
        assert len(sets) == 5
        for chosen in sets.values():
            assert sorted(c.kind for c in chosen) == ["head", "head", "mlp"]
            assert set(chosen) <= set(pool) and len(set(chosen)) == 3
    assert [[c.label for c in v] for v in draws[0].values()] != [[c.label for c in v] for v in draws[1].values()]


@pytest.mark.parametrize("kind", ["mean", "resample"])
def test_ablation_hooks_change_only_the_named_components_and_leave_no_hooks(random_model, kind):
    task = random_model.tsds_config.task
    reference = torch.randint(0, 10, (7, task.max_len))
    tokens = torch.randint(0, 10, (5, task.max_len))
    target = Component("head", 1, 2)
    hooks = ablation_hooks(random_model, [target, Component("mlp", 1)], reference, kind, seed=3)
    names = ["blocks.1.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"]
    _, ref = random_model.run_with_cache(reference, names_filter=lambda n: n in names)
    _, clean = random_model.run_with_cache(tokens, names_filter=lambda n: n in names)
    seen = {}

    def keep(name):
        return lambda act, hook: seen.__setitem__(name, act.detach().clone())
    with torch.no_grad():
        random_model.run_with_hooks(tokens, fwd_hooks=hooks + [(n, keep(n)) for n in names])
    z_ref = ref["blocks.1.attn.hook_z"][:, :, 2]
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    want = z_ref.mean(0, keepdim=True).expand(5, -1, -1) if kind == "mean" else z_ref[perm][torch.arange(5) % 7]
    torch.testing.assert_close(seen["blocks.1.attn.hook_z"][:, :, 2], want, rtol=0, atol=0)
    others = [h for h in range(random_model.cfg.n_heads) if h != 2]
    torch.testing.assert_close(seen["blocks.1.attn.hook_z"][:, :, others], clean["blocks.1.attn.hook_z"][:, :, others],
                               rtol=0, atol=0)
    mlp_ref = ref["blocks.1.hook_mlp_out"]
    want = mlp_ref.mean(0, keepdim=True).expand(5, -1, -1) if kind == "mean" else mlp_ref[perm][torch.arange(5) % 7]
    torch.testing.assert_close(seen["blocks.1.hook_mlp_out"], want, rtol=0, atol=0)
    for name in ("blocks.0.attn.hook_z", "blocks.0.hook_mlp_out"):  # upstream of the ablation: untouched
        torch.testing.assert_close(seen[name], clean[name], rtol=0, atol=0)
    assert _no_hooks(random_model)


def test_step_dissociation_measures_states_and_both_ablations(trained_steps):
    paths, _ = trained_steps
    model = load(paths["sft"])
    task = model.tsds_config.task
    circuits = {"decision": ["L1H0"], "sampling": ["L0.mlp", "L0H1"]}
    df = dissociation(model, circuits, TaskConfig.format_cells(task.train_cells), n_questions=24, samples=4,
                      n_boot=50, controls=2, ablations=("mean", "resample"))
    assert set(df.ablation) == {"none", "mean", "resample"}
    assert set(df.metric) == {"within_auc", "logit_gap", "greedy_accuracy", "sample_accuracy"}
    none = df[(df.ablated == "none")].set_index("metric")
    assert none.loc["sample_accuracy", "n"] == 24 and 0 <= none.loc["sample_accuracy", "value"] <= 1
    for kind in ("mean", "resample"):
        part = df[df.ablation == kind]
        assert {"sampling circuit control 0", "sampling circuit control 1", "decision circuit control 1"} <= set(
            part.ablated)
        ctrl = part[part.ablated == "sampling circuit control 1"].components.iloc[0].split()
        assert sorted("mlp" in c for c in ctrl) == [False, True] and not set(ctrl) & {"L1H0", "L0.mlp", "L0H1"}
    assert _no_hooks(model)


def test_function_measure_scores_fixed_candidates_of_either_model(trained_steps):
    """The decision is scored on the candidates of the model named by ``candidates_from`` (fixed across
    hooks), so an RL model can be measured on its SFT model's own wrong steps, as where_rl_changed does."""
    from tsds_interp.circuits import function_measure

    paths, _ = trained_steps
    sft, rl = load(paths["sft"]), load(paths["rl"])
    cells = sft.tsds_config.task.train_cells
    own = function_measure(sft, cells, n_questions=24, samples=4, seed=3)([])
    same = function_measure(sft, cells, n_questions=24, samples=4, seed=3, candidates_from=sft)([])
    assert all(np.array_equal(own[k], same[k]) for k in own)
    on_sft = function_measure(rl, cells, n_questions=24, samples=4, seed=3, candidates_from=sft)([])
    assert len(on_sft["within_auc"]) == len(own["within_auc"])  # the same states with the same wrong steps
    assert ((0 <= on_sft["within_auc"]) & (on_sft["within_auc"] <= 1)).all()
    assert len(own["sample_accuracy"]) == 24 and set(np.unique(own["sample_accuracy"])) <= {0.0, 1.0}
