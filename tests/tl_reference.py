"""Comparisons with TransformerLens shared by the tests that run other models."""

import torch
import transformer_lens.patching as tlp
from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

from tsds_interp.patching import activation_patch, attribution_patch

TL_GRIDS = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
            "mlp_out": tlp.get_act_patch_mlp_out, "head": tlp.get_act_patch_attn_head_out_all_pos,
            "head_pos": tlp.get_act_patch_attn_head_out_by_pos}


def assert_grids_match(model, clean, corrupted, metric, direction="denoise", skip=(), atol=1e-4):
    """Every grid of :func:`activation_patch` equals ``transformer_lens.patching``'s."""
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    _, source_cache = model.run_with_cache(source)
    for grid, reference in TL_GRIDS.items():
        if grid in skip:
            continue
        ours = activation_patch(model, clean, corrupted, metric, grid, direction)
        theirs = reference(model, base, source_cache, metric)
        assert ours.shape == theirs.shape, grid
        assert torch.allclose(ours, theirs, atol=atol), (grid, float((ours - theirs).abs().max()))


def assert_attribution_matches(model, clean, corrupted, metric, row_metric, atol=1e-4) -> int:
    """Head x position and MLP attribution patching equal TransformerLens's ``attribution_patch``
    node scores (``row_metric`` reads one pair's logits, ``metric`` the batch mean); returns the
    number of nodes compared."""
    theirs = tl_attribution_patch(model, clean, corrupted, row_metric).node_scores
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
