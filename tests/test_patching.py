import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import transformer_lens.patching as tlp
from transformer_lens.tools.analysis.attribution_patching import Node
from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attr

from tsds_interp import patching
from tsds_interp.cli.patch import main as patch_main
from tsds_interp.edges import edge_attribution, edge_patch
from tsds_interp.model import ModelConfig, build_model, load, save
from tsds_interp.pairs import Pairs, decision_pairs, sampling_pairs
from tsds_interp.patching import (
    activation_patch,
    attribution_patch,
    check_patching_args,
    gap_line,
    normalized,
    run_patching,
    top_components,
)

TL = {"resid_pre": tlp.get_act_patch_resid_pre, "attn_out": tlp.get_act_patch_attn_out,
      "mlp_out": tlp.get_act_patch_mlp_out, "head": tlp.get_act_patch_attn_head_out_all_pos,
      "head_pos": tlp.get_act_patch_attn_head_out_by_pos}


@pytest.fixture(scope="module")
def model(tiny_cfg):
    return build_model(ModelConfig(**{**tiny_cfg.to_dict(), "seed": 3}))


@pytest.fixture(scope="module")
def pairs(model):
    return sampling_pairs(model.tsds_config.task, 5, seed=0)


def _contrast(model):
    clean = torch.arange(8).repeat(2, 1) % model.cfg.d_vocab
    corrupted = clean.clone()
    corrupted[:, 3] += 1
    return clean, corrupted


def _no_hooks(model):
    return not any(h.fwd_hooks or h.bwd_hooks for h in model.hook_dict.values())


@pytest.mark.parametrize("grid", list(TL))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_batched_patching_equals_transformer_lens(model, pairs, grid, direction):
    base, source = (pairs.corrupted, pairs.clean) if direction == "denoise" else (pairs.clean, pairs.corrupted)
    _, source_cache = model.run_with_cache(source)
    ref = TL[grid](model, base, source_cache, pairs.metric)
    ours = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, grid, direction,
                            memory_mb=0.05)  # tiny budget: exercises chunking
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1e-4
    assert _no_hooks(model)


def test_decision_pairs_equal_transformer_lens(model):
    pairs = decision_pairs(model, model.tsds_config.task, 6, seed=1)
    assert set(pairs.origin) <= {"model", "corruption"}
    assert not torch.equal(pairs.clean, pairs.corrupted)
    _, cache = model.run_with_cache(pairs.clean)
    ref = TL["head_pos"](model, pairs.corrupted, cache, pairs.metric)
    ours = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head_pos")
    assert (ours - ref).abs().max() <= 1e-4


def test_clean_into_clean_is_one_and_corrupted_into_corrupted_is_zero(model, pairs):
    clean_v = pairs.metric(model(pairs.clean)).item()
    corr_v = pairs.metric(model(pairs.corrupted)).item()
    same_clean = activation_patch(model, pairs.clean, pairs.clean, pairs.metric, "head_pos")
    same_corr = activation_patch(model, pairs.corrupted, pairs.corrupted, pairs.metric, "head_pos")
    assert torch.allclose(normalized(same_clean, clean_v, corr_v, "denoise"), torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(normalized(same_corr, clean_v, corr_v, "denoise"), torch.tensor(0.0), atol=1e-4)
    # resid_pre at the last layer and every position is the whole clean run
    full = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "resid_pre")
    assert normalized(full, clean_v, corr_v, "denoise")[0].max() < 1.5


def test_attribution_agrees_with_transformer_lens_nodes(model, pairs):
    model.eval()
    ref: dict = {}
    for i in range(len(pairs)):  # TL scores pair by pair; ours scores the batch mean at once
        one = dataclasses.replace(pairs, clean=pairs.clean[i : i + 1], corrupted=pairs.corrupted[i : i + 1],
                                  answer=pairs.answer[i : i + 1])
        for node, score in tl_attr(model, one.clean, one.corrupted, one.metric).node_scores.items():
            ref[node] = ref.get(node, 0.0) + score / len(pairs)
    ours_z = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head_pos")
    ours_mlp = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "mlp_out")
    for node, score in ref.items():
        if node.kind == "attn_head_out":
            assert ours_z[node.layer, node.position, node.head].item() == pytest.approx(score, abs=1e-5)
        elif node.kind == "mlp_out":
            assert ours_mlp[node.layer, node.position].item() == pytest.approx(score, abs=1e-5)
    assert any(n.kind == "attn_head_out" for n in ref) and isinstance(next(iter(ref)), Node)
    assert _no_hooks(model)


def test_integrated_gradients_runs_and_tracks_exact(model, pairs):
    exact = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head")
    base = pairs.metric(model(pairs.corrupted)).item()
    ig = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head", ig_steps=4)
    corr = torch.corrcoef(torch.stack([ig.flatten(), (exact - base).flatten()]))[0, 1]
    assert corr > 0.8
    assert _no_hooks(model)


@pytest.mark.parametrize("grid", ["resid_pre", "attn_out", "mlp_out", "head"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_integrated_gradients_add_up_to_patching_the_whole_activation(model, pairs, grid, direction):
    """Completeness: one layer's integrated-gradient scores summed over its cells equal the change of
    the metric from patching that layer's whole activation (the straight path's two ends), up to the
    midpoint rule's error, which 32 steps make over 100x smaller than the one-step estimate's."""
    clean, corrupted, metric = pairs.clean, pairs.corrupted, pairs.metric
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    names = [patching.hook_name(grid, layer) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, src = model.run_with_cache(source, names_filter=lambda n: n in names)
        base_value = float(metric(model(base)))
        exact = torch.tensor([float(metric(model.run_with_hooks(base, fwd_hooks=[(n, lambda a, hook, n=n: src[n])])))
                              - base_value for n in names])
    ig = attribution_patch(model, clean, corrupted, metric, grid, direction, ig_steps=32)
    one = attribution_patch(model, clean, corrupted, metric, grid, direction, ig_steps=1)
    ig_sum, one_sum = ig.flatten(1).sum(1), one.flatten(1).sum(1)
    assert exact.abs().min() > 1e-2  # every layer's patch moves the metric
    torch.testing.assert_close(ig_sum, exact, rtol=1e-3, atol=(exact - one_sum).abs().max().item() / 100)
    assert _no_hooks(model) and all(p.grad is None for p in model.parameters())


def test_hooks_removed_when_metric_raises(model, pairs):
    def bad(logits):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        attribution_patch(model, pairs.clean, pairs.corrupted, bad, "head")
    assert _no_hooks(model)


def test_unknown_grid_and_shape_errors(model, pairs):
    with pytest.raises(ValueError, match="unknown patching grid"):
        activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "attn_pattern")
    with pytest.raises(ValueError, match="same shape"):
        activation_patch(model, pairs.clean, pairs.corrupted[:, :-1], pairs.metric)


def test_patch_cli(model, tmp_path, capsys):
    save(model, tmp_path / "ck")
    out = tmp_path / "out"
    assert patch_main(["--checkpoint", str(tmp_path / "ck"), "--pairs", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "top decision components" in text and "top sampling components" in text
    assert {"patching.csv", "run.json", "decision_head.png", "sampling_head.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "run.json").read_text())["fast_path"] == "own weights (exact)"
    assert patch_main(["--checkpoint", str(tmp_path / "ck"), "--pairs", "4", "--out", str(out),
                       "--method", "attribution", "--granularity", "layer", "--function", "sampling"]) == 0
    edges = tmp_path / "edges"
    assert patch_main(["--checkpoint", str(tmp_path / "ck"), "--pairs", "4", "--out", str(edges),
                       "--granularity", "edge", "--method", "attribution", "--ig-steps", "3"]) == 0
    assert "->" in capsys.readouterr().out
    df = pd.read_csv(edges / "patching.csv")
    assert set(df.grid) == {"edge"}
    assert {"decision_edges.png", "sampling_edges.png"} <= {p.name for p in edges.iterdir()}
    assert len(df) == 2 * 54  # every valid edge of 2 layers x (4 heads + MLP), embed and logits, per function


def test_patch_cli_errors(tmp_path, capsys):
    assert patch_main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err
    assert patch_main(["--checkpoint", str(tmp_path), "--pairs", "0"]) == 2
    assert "--pairs: must be an integer in [1, 10000], got 0" in capsys.readouterr().err
    assert patch_main(["--checkpoint", "sft", "--ig-steps", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--ig-steps: must be an integer in [1, 1000]" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert patch_main(["--checkpoint", "sft", "--cells", "7x7", "--out", str(tmp_path / "o")]) == 2
    assert "in-distribution cells" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert patch_main(["--method", "magic"]) == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["head", "head_pos", "attn_out"])
def test_attribution_equals_exact_patching_when_metric_is_linear(grid):
    """One attention-only layer, no layer norm, a metric linear in the logits: the metric is
    linear in every head's output, so the first-order estimate is exact."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=16, d_head=4, n_heads=4, n_layers=1, n_ctx=12, d_vocab=17,
                                  attn_only=True, normalization_type=None, seed=0, model_name="linear")
    model = TransformerBridge.boot_native(cfg)
    model.eval()
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 17, (3, 12), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4:7] = torch.randint(0, 17, (3, 3), generator=g)

    def metric(logits):
        return (logits[:, -1, 3] - 0.5 * logits[:, -1, 7]).mean()
    with torch.no_grad():
        base = float(metric(model(corrupted)))
    exact = activation_patch(model, clean, corrupted, metric, grid) - base
    approx = attribution_patch(model, clean, corrupted, metric, grid)
    assert exact.abs().max() > 1e-3
    assert torch.allclose(approx, exact, atol=1e-5, rtol=1e-4)
    assert _no_hooks(model)


def test_patch_cli_runs_under_bf16_autocast(tmp_path, capsys):
    assert patch_main(["--checkpoint", "rl", "--function", "sampling", "--pairs", "4", "--autocast", "bf16",
                       "--out", str(tmp_path)]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["autocast"] == "bf16" and run["peak_memory_mb"] > 0


def test_normalized_scores_only_where_the_gap_interval_excludes_zero(model):
    from tsds_interp.pairs import Pairs
    from tsds_interp.patching import run_patching
    sft = load("sft")
    real = decision_pairs(sft, sft.tsds_config.task, 8, seed=0, cells="1x1")  # truth vs wrong: gap of several logits
    df = run_patching(sft, "decision", "activation", "head", pairs=real)
    assert df.normalized_defined.all() and df.gap_lo.iloc[0] > 0 and df.value.notna().all()
    assert df.effect.to_numpy() == pytest.approx((df.value * df.gap).to_numpy(), abs=1e-4)
    none = Pairs("decision", real.clean, real.clean.clone(), real.answer, real.origin, real.prompt_len)
    df = run_patching(sft, "decision", "attribution", "head", pairs=none)
    assert not df.normalized_defined.any() and df.value.isna().all()
    assert df.gap.iloc[0] == df.gap_lo.iloc[0] == df.gap_hi.iloc[0] == 0
    assert df.effect.abs().max() == 0  # nothing differs, so nothing to attribute


def test_decision_pairs_use_own_wrong_samples_of_the_chosen_cells():
    from tsds_interp.task import num_digits, parse_candidate
    sft = load("sft")
    task = sft.tsds_config.task
    p = decision_pairs(sft, task, 12, seed=0, cells="2x3,3x2")
    assert p.cells == ["2x3", "3x2"] and p.cell_rule == "given" and p.origin == ["model"] * 12
    P = task.prompt_len
    assert torch.equal(p.clean[:, :P], p.corrupted[:, :P])
    a = torch.tensor([int("".join(map(str, r[1 : 1 + task.width].tolist()))) for r in p.clean])
    b = torch.tensor([int("".join(map(str, r[2 + task.width : 2 + 2 * task.width].tolist()))) for r in p.clean])
    cells = set(zip(num_digits(a).tolist(), num_digits(b).tolist()))
    assert cells <= {(2, 3), (3, 2)}
    assert (parse_candidate(p.clean[:, P:], task) == a * b).all()
    wrong = parse_candidate(p.corrupted[:, P:], task)
    assert ((wrong >= 0) & (wrong != a * b)).all()
    with pytest.raises(ValueError, match="wrong samples"):
        decision_pairs(sft, task, 500, seed=0, cells="1x1", fallback=False, max_rounds=1)
    with pytest.raises(ValueError, match="in-distribution cells"):
        decision_pairs(sft, task, 4, cells="3x3")


@pytest.mark.parametrize("grid", ["head", "head_pos"])
def test_bf16_patching_is_within_five_percent_of_the_largest_fp32_effect(grid):
    """bfloat16 autocast keeps about three significant digits: the patched metric differs from float32
    by at most 5% of the largest effect (measured here: 1.4% head, 0.8% head x position)."""
    from tsds_interp.model import autocast

    model = load("sft")
    pairs = decision_pairs(model, model.tsds_config.task, 8, seed=0, cells="1x1")
    fp32 = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, grid)
    with autocast("cpu", "bf16"):
        bf16 = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, grid)
    with torch.no_grad():
        effect = (fp32 - float(pairs.metric(model(pairs.corrupted)))).abs().max()
    assert effect > 1.0  # a contrast with something to measure
    assert (fp32 - bf16).abs().max() <= 0.05 * effect
    assert not torch.equal(fp32, bf16)  # bf16 did run


def test_top_components_name_each_cell_with_its_position_and_keep_the_largest_per_function():
    """A hand-made table: per-position cells carry ``@pos``; cells without a position (whole heads,
    edges) do not; the k largest |effect| per function, largest first."""
    rows = [dict(function="decision", grid="head_pos", layer=1, head=2, pos=5, effect=-0.7, value=0.1),
            dict(function="decision", grid="head_pos", layer=1, head=2, pos=6, effect=0.2, value=0.2),
            dict(function="decision", grid="head", layer=0, head=3, effect=0.5, value=0.3),
            dict(function="decision", grid="attn_out", layer=0, pos=0, effect=0.05, value=0.4),
            dict(function="sampling", grid="mlp_out", layer=1, pos=2, effect=0.3, value=0.5),
            dict(function="sampling", grid="resid_pre", layer=0, pos=7, effect=-0.9, value=0.6),
            dict(function="sampling", grid="edge", source="L0H1", target="logits", effect=0.01, value=0.7)]
    top = top_components(pd.DataFrame(rows), k=3)
    assert top.to_dict("records") == [
        dict(function="sampling", component="L0.resid@7", effect=-0.9, value=0.6),
        dict(function="decision", component="L1H2@5", effect=-0.7, value=0.1),
        dict(function="decision", component="L0H3", effect=0.5, value=0.3),
        dict(function="sampling", component="L1.mlp@2", effect=0.3, value=0.5),
        dict(function="decision", component="L1H2@6", effect=0.2, value=0.2),
        dict(function="sampling", component="L0H1->logits", effect=0.01, value=0.7)]
    assert top_components(pd.DataFrame(rows), k=1).component.tolist() == ["L0.resid@7", "L1H2@5"]


def test_patching_settings_are_refused_by_exact_message_just_past_their_bounds(model):
    good = dict(function="decision", method="activation", granularity="head", direction="denoise", n_pairs=1,
                seed=0, memory_mb=1e7, ig_steps=1000)
    check_patching_args(**good)
    check_patching_args(function="sampling", method="attribution", granularity="edge", direction="noise",
                        n_pairs=10_000, seed=2**32 - 1, memory_mb=1e-3, ig_steps=1)
    for granularity in ("layer", "head_pos"):
        check_patching_args(**{**good, "granularity": granularity})
    cases = [("function", "x", "function must be one of decision, sampling, got 'x'"),
             ("method", "x", "method must be one of activation, attribution, got 'x'"),
             ("granularity", "x", "granularity must be one of layer, head, head_pos, edge, got 'x'"),
             ("direction", "x", "direction must be one of denoise, noise, got 'x'"),
             ("n_pairs", 0, "n_pairs must be an integer in [1, 10000], got 0"),
             ("n_pairs", 10_001, "n_pairs must be an integer in [1, 10000], got 10001"),
             ("n_pairs", 2.5, "n_pairs must be an integer in [1, 10000], got 2.5"),
             ("memory_mb", 0, "memory_mb must be a finite number in (0, 10000000], got 0"),
             ("memory_mb", 1.1e7, "memory_mb must be a finite number in (0, 10000000], got 11000000.0"),
             ("ig_steps", 0, "ig_steps must be an integer in [1, 1000], got 0"),
             ("ig_steps", 1001, "ig_steps must be an integer in [1, 1000], got 1001"),
             ("ig_steps", 1.5, "ig_steps must be an integer in [1, 1000], got 1.5"),
             ("seed", -1, "seed must be an integer in [0, 4294967295], got -1")]
    for key, value, message in cases:
        with pytest.raises(ValueError) as err:
            check_patching_args(**{**good, key: value})
        assert str(err.value) == message
    for steps in (0, 1001, 1.5):
        with pytest.raises(ValueError) as err:
            attribution_patch(model, *_contrast(model), lambda lg: lg[:, -1, 0].mean(), "resid_pre", ig_steps=steps)
        assert str(err.value) == f"ig_steps must be an integer in [1, 1000], got {steps}"


    class Reached(Exception):
        pass

    def reached(logits):
        raise Reached  # the settings were accepted and the work began

    with pytest.raises(Reached):
        attribution_patch(model, *_contrast(model), reached, "resid_pre", ig_steps=1000)
    with pytest.raises(ValueError, match=r"^n_pairs must be an integer in \[1, 10000\], got 0$"):
        run_patching(model, "decision", n_pairs=0)  # the library entry point checks before any work


def test_the_gap_line_states_the_contrast_and_whether_normalizing_is_defined():
    row = dict(gap=0.6654, gap_lo=0.0812, gap_hi=1.4831, pairs=32, own_wrong_pairs=20, cells="1x1,1x2",
               cell_rule="in-distribution cells with errors", normalized_defined=True)
    decision = pd.DataFrame([{**row, "function": "decision"}] * 2)
    assert gap_line(decision) == (
        "decision: clean - corrupted metric 0.665 [0.081, 1.483] over 32 pairs, 20 with the model's own wrong "
        "sample; cells 1x1,1x2 (in-distribution cells with errors); normalized scores shown")
    sampling = pd.DataFrame([{**row, "function": "sampling", "gap_lo": -0.2, "normalized_defined": False},
                             {**row, "function": "sampling"}])
    assert gap_line(sampling) == (
        "sampling: clean - corrupted metric 0.665 [-0.200, 1.483] over 32 pairs; cells 1x1,1x2 "
        "(in-distribution cells with errors); the interval includes 0: normalized scores are undefined, "
        "raw effects only")


@pytest.fixture(scope="module")
def sft():
    return load("sft")


@dataclasses.dataclass
class _Scaled(Pairs):
    """Pairs whose metric is multiplied by ``scale`` (to place the gap's interval where a test needs it)."""
    scale: float = 1.0

    def metric_per_pair(self, logits):
        return super().metric_per_pair(logits) * self.scale


@pytest.mark.parametrize("method,granularity,direction", [
    ("activation", "head", "noise"), ("activation", "layer", "denoise"), ("attribution", "head_pos", "noise"),
    ("attribution", "layer", "denoise"), ("activation", "edge", "noise"), ("attribution", "edge", "denoise")])
def test_run_patching_rows_are_the_primitives_results_on_the_same_pairs(sft, method, granularity, direction):
    """Each row's effect is what activation_patch / attribution_patch / edge_patch / edge_attribution give
    on the same pairs and settings, its value that effect rescaled by hand (0 = corrupted, 1 = clean),
    with the gap's interval placed at lo = 0.5 so that normalizing is defined."""
    model = sft
    plain = sampling_pairs(model.tsds_config.task, 6, seed=0)
    gap, lo, hi = plain.gap(model, n_boot=200, seed=5)
    assert lo > 0 or hi < 0, (lo, hi)  # the shipped model's sampling pairs have a gap of one sign
    pairs = _Scaled(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(Pairs)},
                    scale=0.5 / lo if lo > 0 else -0.5 / hi)
    df = run_patching(model, "sampling", method, granularity, direction=direction, pairs=pairs, n_boot=200, seed=5,
                      ig_steps=3)
    with torch.no_grad():
        clean_v, corr_v = (float(pairs.metric(model(t))) for t in (pairs.clean, pairs.corrupted))
    base_v = corr_v if direction == "denoise" else clean_v
    assert (df.gap_lo if lo > 0 else -df.gap_hi).iloc[0] == pytest.approx(0.5)
    assert (df.gap.iloc[0], df.gap_lo.iloc[0], df.gap_hi.iloc[0]) == pytest.approx(pairs.gap(model, 200, seed=5))
    assert df.normalized_defined.all() and (df.method == method).all() and (df.function == "sampling").all()
    assert (df.clean_metric == clean_v).all() and (df.corrupted_metric == corr_v).all()
    args = (model, pairs.clean, pairs.corrupted, pairs.metric)
    if granularity == "edge":
        assert (df.grid == "edge").all() and len(df) == 207  # every valid edge of 4 layers x 4 heads + MLPs
        edges = list(zip(df.source, df.target))
        expected = (edge_patch(*args, edges, direction).effect.to_numpy() if method == "activation"
                    else edge_attribution(*args, direction, ig_steps=3).score.to_numpy())
    else:
        parts = []
        for grid in {"head": ["head"], "head_pos": ["head_pos"], "layer": ["attn_out", "mlp_out"]}[granularity]:
            raw = (activation_patch(*args, grid, direction) - base_v if method == "activation"
                   else attribution_patch(*args, grid, direction, ig_steps=3))
            parts.append(raw.flatten().numpy())
        expected = np.concatenate(parts)
    np.testing.assert_allclose(df.effect.to_numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(df.value.to_numpy(), (expected + base_v - corr_v) / (clean_v - corr_v),
                               rtol=1e-4, atol=1e-5)
