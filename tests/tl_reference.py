"""Comparisons with TransformerLens shared by the tests that run other models."""

import torch
import transformer_lens.patching as tlp
from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

from tsds_interp.patching import activation_patch, attribution_patch

TL_GRIDS = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
            "mlp_out": tlp.get_act_patch_mlp_out, "head": tlp.get_act_patch_attn_head_out_all_pos,
            "head_pos": tlp.get_act_patch_attn_head_out_by_pos}


REL, FLOOR = 1e-3, 1e-6  # agreement asked: 0.1% of the largest effect of the grid, plus float noise


def assert_grids_match(model, clean, corrupted, metric, direction="denoise", skip=()):
    """Every grid of :func:`activation_patch` equals ``transformer_lens.patching``'s to 0.1% of the
    grid's largest effect (change of the metric from the base run), and that effect is not trivial."""
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    _, source_cache = model.run_with_cache(source)
    with torch.no_grad():
        base_value = float(metric(model(base)))
    for grid, reference in TL_GRIDS.items():
        if grid in skip:
            continue
        ours = activation_patch(model, clean, corrupted, metric, grid, direction)
        theirs = reference(model, base, source_cache, metric)
        assert ours.shape == theirs.shape, grid
        effect = float((theirs - base_value).abs().max())
        assert effect > 10 * FLOOR, (grid, effect)  # something to compare
        diff = float((ours - theirs).abs().max())
        assert diff <= REL * effect + FLOOR, (grid, diff, effect)


def assert_attribution_matches(model, clean, corrupted, metric, row_metric) -> int:
    """Head x position and MLP attribution patching equal TransformerLens's ``attribution_patch``
    node scores (``row_metric`` reads one pair's logits, ``metric`` the batch mean) to 0.1% of the
    largest score; returns the number of nodes compared."""
    theirs = tl_attribution_patch(model, clean, corrupted, row_metric).node_scores
    largest = max(abs(float(v)) for v in theirs.values())
    assert largest > 10 * FLOOR, largest
    atol = REL * largest + FLOOR
    heads = attribution_patch(model, clean, corrupted, metric, "head_pos")
    mlps = attribution_patch(model, clean, corrupted, metric, "mlp_out")
    checked = 0
    for node, score in theirs.items():
        if node.kind == "attn_head_out":
            ours = heads[node.layer, node.position, node.head]
        elif node.kind == "mlp_out":
            ours = mlps[node.layer, node.position]
        else:
            continue
        assert abs(float(ours) - score) < atol, node
        checked += 1
    return checked
