"""Edge attribution: exact where the metric is linear in the edge, tracks exact path patching elsewhere."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

from tsds_interp.edges import (
    check_supported,
    draw_graph,
    edge_attribution,
    edge_patch,
    feeds,
    nodes,
    prune,
    reader_grads,
)
from tsds_interp.model import load
from tsds_interp.pairs import decision_pairs


def _no_hooks(model):
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


def _bridge(normalization_type, seed=1):
    cfg = TransformerBridgeConfig(d_model=32, d_head=8, n_heads=4, n_layers=2, n_ctx=16, d_vocab=17, d_mlp=64,
                                  act_fn="gelu", normalization_type=normalization_type, seed=seed, model_name="t")
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    return model


def _random_layernorms(model, seed=3):
    """LayerNorm weights and biases drawn away from their initial 1 and 0, so both take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln" in f".{name}" and name.endswith((".weight", ".bias")):
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))
    return model


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 17, (5, 9), generator=g)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(0, 17, (5,), generator=g)
    return clean, corrupted


def logit_diff(logits):
    return (logits[:, -1, 2] - logits[:, -1, 5]).mean()


def test_edges_into_linear_logits_equal_exact_path_patching():
    model = _bridge(None)  # no final norm: the metric is linear in every edge into the logits
    clean, corrupted = _tokens(0)
    for direction in ("denoise", "noise"):
        attr = edge_attribution(model, clean, corrupted, logit_diff, direction)
        into_logits = attr[attr.target == "logits"]
        exact = edge_patch(model, clean, corrupted, logit_diff, list(zip(into_logits.source, into_logits.target)),
                           direction)
        assert np.abs(into_logits.score.to_numpy()).max() > 1e-3
        np.testing.assert_allclose(into_logits.score.to_numpy(), exact.effect.to_numpy(), atol=1e-4, rtol=1e-4)
    assert _no_hooks(model)


def test_head_input_gradients_add_up_to_the_layers_attention_input_gradient():
    model = _random_layernorms(_bridge("LN"))
    clean, _ = _tokens(1)
    grads = reader_grads(model, clean, logit_diff)
    H = model.cfg.n_heads
    leaf = {}

    def add(a, hook):
        leaf["x"] = torch.zeros_like(a, requires_grad=True)
        return a + leaf["x"]

    for layer in range(model.cfg.n_layers):
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.ln1.hook_in", add)]):
            (g,) = torch.autograd.grad(logit_diff(model(clean)), leaf["x"])
        heads = grads[layer * (H + 1) : layer * (H + 1) + H].sum(0)
        torch.testing.assert_close(heads, g, atol=1e-5, rtol=1e-4)
    assert _no_hooks(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("norm", ["LN", "LNPre", None])
def test_patching_any_edge_between_identical_runs_changes_nothing(norm):
    """The receiver's input is recomputed by hand (its LayerNorm, then its own q, k, v): with no
    difference to add, that must reproduce the model's own run exactly, LayerNorm weight and bias
    included (drawn away from their initial 1 and 0)."""
    model = _random_layernorms(_bridge(norm))
    sd = model.state_dict()
    if norm == "LN":
        assert all((sd[f"blocks.{i}.ln1.weight"] - 1).abs().min() > 0 and sd[f"blocks.{i}.ln1.bias"].abs().min() > 0
                   for i in range(2))
    clean, corrupted = _tokens(4)
    writers, readers = nodes(model)
    edges = [(u.label, v.label) for u in writers for v in readers if feeds(u, v) and v.kind == "head"]
    assert len(edges) == 4 * 1 + 4 * (1 + 4 + 1)  # layer 0 heads read embed; layer 1 heads also all of layer 0
    same = edge_patch(model, clean, clean, logit_diff, edges)
    assert np.abs(same.effect.to_numpy()).max() < 1e-5
    moved = edge_patch(model, clean, corrupted, logit_diff, edges)
    assert np.abs(moved.effect.to_numpy()).max() > 1e-3  # the same edges do carry a difference


SUPPORTED = {"normalization_type": ("LN", "LNPre", None), "positional_embedding_type": ("standard",),
             "n_key_value_heads": (None,), "parallel_attn_mlp": (False, None), "attn_only": (False, None),
             "final_rms": (False, None)}
REFUSED = {"normalization_type": "RMS", "positional_embedding_type": "rotary", "n_key_value_heads": 2,
           "parallel_attn_mlp": True, "attn_only": True, "final_rms": True}


def test_edge_attribution_refuses_each_layout_it_does_not_reproduce_by_name():
    plain = {key: allowed[0] for key, allowed in SUPPORTED.items()}
    for key, allowed in SUPPORTED.items():
        for value in allowed:
            check_supported(SimpleNamespace(cfg=SimpleNamespace(**{**plain, key: value})))
        cfg = SimpleNamespace(**{**plain, key: REFUSED[key]})
        with pytest.raises(ValueError) as err:
            check_supported(SimpleNamespace(cfg=cfg))
        assert str(err.value) == f"edge attribution supports {key} in {allowed}, this model has {REFUSED[key]!r}"


def test_edge_attribution_tracks_exact_edge_patching_on_the_shipped_model():
    model = load("sft")
    pairs = decision_pairs(model, model.tsds_config.task, 8, seed=0, cells="1x1,1x2")
    attr = edge_attribution(model, pairs.clean, pairs.corrupted, pairs.metric, ig_steps=5)
    exact = edge_patch(model, pairs.clean, pairs.corrupted, pairs.metric, list(zip(attr.source, attr.target)))
    assert len(attr) == 207  # every valid edge of 4 layers x 4 heads + MLPs, embed and logits
    assert np.corrcoef(attr.score, exact.effect)[0, 1] > 0.9
    assert _no_hooks(model)


def test_edge_rules_and_refusals(tmp_path):
    model = _bridge("LN")
    writers, readers = nodes(model)
    by = {n.label: n for n in writers + readers}
    assert feeds(by["embed"], by["L1H2"]) and feeds(by["L0H1"], by["L0.mlp"]) and feeds(by["L1.mlp"], by["logits"])
    assert not feeds(by["L1H0"], by["L1H3"]) and not feeds(by["L1.mlp"], by["L1.mlp"])
    assert not feeds(by["L1.mlp"], by["L1H0"])
    clean, corrupted = _tokens(2)
    with pytest.raises(ValueError, match="does not feed"):
        edge_patch(model, clean, corrupted, logit_diff, [("L1.mlp", "L0H0")])
    with pytest.raises(ValueError, match="unknown edge"):
        edge_patch(model, clean, corrupted, logit_diff, [("L9H0", "logits")])
    with pytest.raises(ValueError, match="normalization_type"):
        check_supported(SimpleNamespace(cfg=SimpleNamespace(normalization_type="RMS")))
    with pytest.raises(ValueError, match="positional_embedding_type"):
        rotary = SimpleNamespace(normalization_type="LN", positional_embedding_type="rotary")
        check_supported(SimpleNamespace(cfg=rotary))
    with pytest.raises(ValueError, match="same shape"):
        edge_attribution(model, clean, corrupted[:, :4], logit_diff)
    top = prune(edge_attribution(model, clean, corrupted, logit_diff), 5)
    assert len(top) == 5
    draw_graph(top, model, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_the_graph_draws_each_edge_once_where_its_nodes_are_with_sign_colour_and_width(random_model, tmp_path,
                                                                                     monkeypatch):
    """An arrow per edge from its source's place to its target's (heads by index along a layer's row,
    MLPs to the right half a layer up, embed below and logits above), red when it raises the metric
    and blue when it lowers it, width 0.5 + 4 |score| / max |score|; nodes on an edge black and
    labelled large, the others grey; a legend that gives the largest score."""
    import matplotlib.colors as mcolors
    import matplotlib.figure
    import pandas as pd
    from matplotlib.patches import FancyArrowPatch

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    edges = pd.DataFrame({"source": ["embed", "L0.mlp", "L1H3"], "target": ["L0H1", "L1H2", "logits"],
                          "score": [0.5, -2.0, 0.25]})
    draw_graph(edges, random_model, tmp_path / "g.png", title="three edges")
    (fig,) = saved
    (ax,) = fig.axes
    H = random_model.cfg.n_heads
    place = {"embed": (H / 2, -1), "L0.mlp": (H + 0.6, 0.5), "L1H3": (3, 1), "L0H1": (1, 0), "L1H2": (2, 1),
             "logits": (H / 2, 2)}
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == 3
    for arrow, edge in zip(arrows, edges.itertuples()):
        assert [tuple(map(float, p)) for p in arrow._posA_posB] == [place[edge.source], place[edge.target]]
        colour = "tab:red" if edge.score > 0 else "tab:blue"
        assert arrow.get_edgecolor() == pytest.approx(mcolors.to_rgba(colour, 0.75))
        assert arrow.get_linewidth() == pytest.approx(0.5 + 4 * abs(edge.score) / 2.0)
    labels = {t.get_text(): t for t in ax.texts}
    assert set(labels) == {n.label for n in nodes(random_model)[0] + nodes(random_model)[1]}
    for name, text in labels.items():
        on = name in place
        assert mcolors.same_color(text.get_color(), "black" if on else "grey"), name
        assert text.get_fontsize() == (8 if on else 6)
        assert tuple(map(float, text.xy)) == (place[name] if on else text.xy)
    sizes = sorted(float(c.get_sizes()[0]) for c in ax.collections)
    assert sizes.count(200.0) == len(place) and set(sizes) == {40.0, 200.0}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "0", "1", "logits"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["raises the metric", "lowers it",
                                                                   "width ~ |score| (max 2)"]
    assert ax.get_title() == "three edges"
