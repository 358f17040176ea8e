import torch

from tsds_interp.ablation import ablation_hook, ablation_sweep, rollout_with_hooks
from tsds_interp.cli.ablation import main
from tsds_interp.components import Component, components
from tsds_interp.rollout import rollout
from tsds_interp.task import sample_questions


def test_zero_wo_head_ablation_changes_nothing(trained_tiny):
    from tsds_interp.model import load
    paths, _ = trained_tiny
    model = load(paths["sft"])
    with torch.no_grad():
        model.blocks[1].attn.o.weight[:, 16:32] = 0  # head 1 of layer 1 (d_head 16) writes nothing
    q = sample_questions(model.tsds_config.task, "test", 64, seed=0)
    base = rollout(model, q, seed=3)
    for mode_hook in (ablation_hook(Component("head", 1, 1), None),
                      ablation_hook(Component("head", 1, 1), torch.randn(1, 20, 16))):
        ablated = rollout_with_hooks(model, q, [("blocks.1.attn.hook_z", mode_hook)], seed=3)
        assert torch.equal(base.tokens, ablated.tokens)
    assert not any(h.fwd_hooks for h in model.hook_dict.values())


def test_sweep_labels_every_component(trained_tiny):
    from tsds_interp.model import load
    paths, _ = trained_tiny
    model = load(paths["sft"])
    df = ablation_sweep(model, n_questions=32, mode="mean", quiet=True)
    n_comp = model.cfg.n_layers * (model.cfg.n_heads + 1)
    assert df.component.nunique() == n_comp
    assert set(df.label) <= {"decision", "sampling", "both", "neither"}
    ok = df.dropna(subset=["delta"])
    assert ((ok.lo <= ok.delta + 1e-9) & (ok.delta <= ok.hi + 1e-9)).all()
    assert (ok.delta.abs() > 0).any()  # some ablation changes the rollouts


def test_ablation_cli_errors(tmp_path):
    assert main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert main(["--checkpoint", str(tmp_path), "--questions", "0"]) == 2


def test_transplanting_every_component_from_an_identical_model_changes_nothing(tiny_cfg):
    from tsds_interp.ablation import transplant_hooks
    from tsds_interp.model import build_model

    target, source = build_model(tiny_cfg), build_model(tiny_cfg)
    tokens = torch.randint(0, 10, (3, 9))
    with torch.no_grad():
        base = target(tokens)
        with target.hooks(fwd_hooks=transplant_hooks(source, components(target))):
            same = target(tokens)
    assert torch.allclose(base, same, atol=1e-6)
    assert not any(h.fwd_hooks for h in target.hook_dict.values())


def test_transplanting_the_changed_component_reproduces_the_source(tiny_cfg):
    from tsds_interp.ablation import transplant_hooks
    from tsds_interp.model import ModelConfig, build_model

    target = build_model(ModelConfig(**{**tiny_cfg.to_dict(), "seed": 11}))
    source = build_model(ModelConfig(**{**tiny_cfg.to_dict(), "seed": 12}))
    source.load_state_dict(target.state_dict())
    with torch.no_grad():  # same weights except the last MLP: transplanting it gives the source's output
        sd = dict(source.named_parameters())
        next(v for k, v in sd.items() if "layers.1." in k and "fc_out" in k and k.endswith("weight")).mul_(2.0)
        tokens = torch.randint(0, 10, (2, 8))
        want = source(tokens)
        with target.hooks(fwd_hooks=transplant_hooks(source, [Component("mlp", 1)])):
            got = target(tokens)
    assert not torch.allclose(want, target(tokens))
    assert torch.allclose(got, want, atol=1e-5)


def test_the_label_rule_on_a_hand_made_table():
    """A metric counts when |delta| >= threshold and its interval excludes 0; p_s makes a sampling
    component, p_d_given_c or p_d_given_w a decision one."""
    import pandas as pd

    from tsds_interp.ablation import label_components

    def rows(comp, **deltas):  # metric -> (delta, lo, hi)
        return [dict(component=comp, metric=m, delta=d, lo=lo, hi=hi) for m, (d, lo, hi) in deltas.items()]
    table = pd.DataFrame(
        rows("S", p_s=(-0.3, -0.4, -0.2), p_d_given_c=(0.01, -0.02, 0.04))
        + rows("D", p_s=(0.0, -0.01, 0.01), p_d_given_w=(0.2, 0.1, 0.3))
        + rows("B", p_s=(-0.1, -0.15, -0.05), p_d_given_c=(-0.08, -0.1, -0.06))
        + rows("small", p_s=(-0.04, -0.05, -0.03))                  # significant but below the threshold
        + rows("noisy", p_s=(-0.3, -0.6, 0.1), p_d_given_w=(0.2, -0.1, 0.5)))  # large, interval spans 0
    labels = label_components(table, threshold=0.05).set_index("component").label.to_dict()
    assert labels == {"S": "sampling", "D": "decision", "B": "both", "small": "neither", "noisy": "neither"}
    assert label_components(table, threshold=0.03).set_index("component").label["small"] == "sampling"


def test_zero_ablation_zeroes_exactly_the_named_slice(random_model):
    c = Component("head", 1, 2)
    act = torch.randn(3, 7, random_model.cfg.n_heads, random_model.cfg.d_head)
    out = ablation_hook(c, None)(act, None)
    assert (out[:, :, 2] == 0).all() and torch.equal(out[:, :, [0, 1, 3]], act[:, :, [0, 1, 3]])
    assert act[:, :, 2].abs().sum() > 0  # the input is untouched
    mean = act.mean(0, keepdim=True)
    out = ablation_hook(Component("mlp", 0), mean)(act, None)
    assert torch.equal(out, mean.expand_as(act))


def test_a_sweep_row_is_the_metric_under_that_components_ablation_against_the_unablated_run():
    """On the shipped RL model (well-formed episodes): one row per component and scored metric, in
    component order, MLPs with head -1; a row's baseline is the unablated rollout's metric on the
    sweep's questions, its ablated value the metric with that component mean-ablated (mean over the
    reference rollouts' rows), delta / lo / hi their difference with its interval, and the label the
    rule's label of the table."""
    from tsds_interp.ablation import SCORED, label_components
    from tsds_interp.metrics import ds_metrics
    from tsds_interp.model import load
    from tsds_interp.stats import proportion_difference

    model = load("rl")
    df = ablation_sweep(model, 24, "mean", seed=3, temperature=0.7, threshold=0.1, quiet=True, max_batch=7)
    comps = components(model)
    assert list(df.component.unique()) == [c.label for c in comps] and len(df) == len(comps) * len(SCORED)
    assert list(df.metric[: len(SCORED)]) == list(SCORED) and (df["mode"] == "mean").all()
    for c in comps:
        rows = df[df.component == c.label]
        assert (rows.layer == c.layer).all() and (rows["head"] == (-1 if c.head is None else c.head)).all()
    assert df[["component", "label"]].drop_duplicates().reset_index(drop=True).equals(label_components(df, 0.1))

    task, kw = model.tsds_config.task, dict(temperature=0.7, seed=3)
    q = sample_questions(task, "test", 24, seed=8)
    base = ds_metrics(rollout(model, q, **kw)).query("cell == 'all'").set_index("metric")
    reference = rollout(model, sample_questions(task, "train", 128, seed=9), **kw).tokens
    c = comps[len(comps) // 2 + 1]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference, names_filter=c.hook_name)
    mean = c.read(cache[c.hook_name]).mean(0, keepdim=True)
    ablated = ds_metrics(rollout_with_hooks(model, q, [(c.hook_name, ablation_hook(c, mean))], **kw))
    ablated = ablated.query("cell == 'all'").set_index("metric")
    row = df[df.component == c.label].set_index("metric")
    for metric in SCORED:
        a, b = base.loc[metric], ablated.loc[metric]
        assert row.loc[metric, "baseline"] == a.value and row.loc[metric, "ablated"] == b.value, metric
        assert tuple(row.loc[metric, ["delta", "lo", "hi"]]) == proportion_difference(a.value, a.n, b.value, b.n)
    assert (df.delta != 0).any()  # the ablations change something on this model
