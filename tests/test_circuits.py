"""Circuits: node scores agree with the patching grids, naming rules, dissociation bookkeeping."""

import pandas as pd
import pytest
import torch

from tsds_interp.circuits import (
    attribute_components,
    dissociation,
    name_circuits,
    node_scores,
    patch_components,
    shared_components,
)
from tsds_interp.components import by_label
from tsds_interp.pairs import sampling_pairs
from tsds_interp.patching import activation_patch, attribution_patch


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
                               "random 1 (control 0)", "random 2 (control 0)"}
    none = df[df.ablated == "none"]
    assert (none.delta == 0).all()
    assert df[df.ablated == "decision circuit"].components.iloc[0] == "L1H0 L0H2"
    random2 = df[df.ablated == "random 2 (control 0)"].components.iloc[0].split()
    assert not set(random2) & {"L1H0", "L0H2", "L0.mlp"}
    assert _no_hooks(random_model)
    with pytest.raises(ValueError, match="unknown component"):
        by_label(random_model, ["L7H0"])
