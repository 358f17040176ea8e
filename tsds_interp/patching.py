"""Contrast pairs, exact (batched) activation patching and attribution patching.

All functions take any TransformerLens hooked model (``run_with_cache``, ``run_with_hooks``,
``start_at_layer``, ``hooks``) and a metric ``logits[batch, pos, vocab] -> scalar`` (the mean over
the batch of a per-pair quantity), exactly as ``transformer_lens.patching`` does.

Grids (``GRIDS``): ``resid_pre``, ``attn_out``, ``mlp_out`` per layer x position; ``head`` (each
head's ``hook_z``, all positions) per layer x head; ``head_pos`` per layer x position x head.

Exact patching runs every cell of a layer as one batch of variants (stacked along the batch axis,
chunked to ``memory_mb``) and starts each of those runs at the patched layer from the base run's
cached residual stream, which the patch cannot change. ``denoise`` patches the clean run's
activation into the corrupted run; ``noise`` the corrupted one into the clean run.

Attribution patching estimates every cell at once as ``(source - base activation) . d metric /
d activation`` with the gradient from backward hooks on the base run (with ``ig_steps > 1``, the
gradient is averaged along the straight line from base to source, one layer at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from tsds_interp import checks
from tsds_interp.components import Component
from tsds_interp.edges import edge_attribution, edge_patch
from tsds_interp.forward import OwnWeights, use_own_weights
from tsds_interp.pairs import Pairs, make_pairs

Metric = Callable[[Tensor], Tensor]
Direction = Literal["denoise", "noise"]
GRIDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("hook_resid_pre", ("layer", "pos")),
    "attn_out": ("hook_attn_out", ("layer", "pos")),
    "mlp_out": ("hook_mlp_out", ("layer", "pos")),
    "head": ("attn.hook_z", ("layer", "head")),
    "head_pos": ("attn.hook_z", ("layer", "pos", "head")),
}


def hook_name(grid: str, layer: int) -> str:
    check_grid(grid)
    return f"blocks.{layer}.{GRIDS[grid][0]}"


def check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"unknown patching grid {grid!r}; choose one of {', '.join(GRIDS)}")


def check_hook_names(model, names: list[str]) -> None:
    """A clear error for hook names the model does not have."""
    known = set(model.hook_dict)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown hook name {bad[0]!r}; the model has e.g. "
                         f"{', '.join(sorted(known)[:4])}, ... (see model.hook_dict)")


# ---------------------------------------------------------------- contrast pairs


# ---------------------------------------------------------------- exact patching

def _cells(axes: tuple[str, ...], n_pos: int, n_heads: int) -> list[tuple[int, ...]]:
    sizes = {"pos": n_pos, "head": n_heads}
    rest = [sizes[a] for a in axes[1:]]
    return [tuple(ix) for ix in np.ndindex(*rest)]


def _patch_variants(act: Tensor, src: Tensor, cells: Tensor, axes: tuple[str, ...], n_var: int) -> Tensor:
    """Write ``src`` into variant i of ``act`` (variants stacked along batch) at cell ``cells[i]``."""
    act = act.clone().view(n_var, -1, *act.shape[1:])
    v = torch.arange(n_var)
    if axes[1:] == ("pos",):
        act[v, :, cells[:, 0]] = src[:, cells[:, 0]].transpose(0, 1)
    elif axes[1:] == ("head",):
        act[v, :, :, cells[:, 0]] = src[:, :, cells[:, 0]].permute(2, 0, 1, 3)
    else:
        act[v, :, cells[:, 0], cells[:, 1]] = src[:, cells[:, 0], cells[:, 1]].transpose(0, 1)
    return act.view(-1, *act.shape[2:])


def _bytes_per_variant(cfg, B: int, T: int) -> int:
    """Activation memory of one patched run of ``B`` sequences of length ``T`` (an estimate)."""
    return 4 * B * T * (cfg.d_model * 12 + cfg.n_heads * T + cfg.d_vocab)


@torch.no_grad()
def activation_patch(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                     metric: Metric, grid: str = "head", direction: Direction = "denoise",
                     memory_mb: float = 256.0) -> Tensor:
    """Metric after patching each cell of ``grid``; shaped like ``transformer_lens.patching``'s
    result ([layer, pos], [layer, head] or [layer, pos, head])."""
    clean, corrupted = checks.contrast(model, clean, corrupted, direction)
    check_grid(grid)
    metric = checks.metric(metric)
    checks.number("memory_mb", memory_mb, lo=0, hi=1e7, lo_open=True)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    if grid == "head_pos" and use_own_weights(model, "head_pos patching"):
        return _PrefixReuse(model).head_pos(base, source, metric, memory_mb)
    cfg = model.cfg
    names = [hook_name(grid, layer) for layer in range(cfg.n_layers)]
    axes = GRIDS[grid][1]
    resid = [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.n_layers)]
    check_hook_names(model, names + resid)
    _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
    _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in resid)
    B, T = base.shape
    # With causal attention, before the first position where any pair differs both runs are
    # identical: patching there is a no-op, so those cells take the base run's metric unrun.
    differs = (clean != corrupted).any(0).nonzero()
    causal = getattr(cfg, "attention_dir", "causal") == "causal"
    first_diff = T if not len(differs) else (int(differs[0]) if causal else 0)
    all_cells = _cells(axes, T, cfg.n_heads)
    live = [i for i, c in enumerate(all_cells) if "pos" not in axes or c[0] >= first_diff]
    cells = [all_cells[i] for i in live]
    chunk = max(1, int(memory_mb * 2**20 // _bytes_per_variant(cfg, B, T)))
    out = torch.empty(cfg.n_layers, len(cells))
    for layer in range(cfg.n_layers if cells else 0):
        src = src_cache[names[layer]]
        for start in range(0, len(cells), chunk):
            cell_ix = torch.tensor(cells[start : start + chunk])
            n_var = len(cell_ix)
            x = base_cache[resid[layer]].repeat(n_var, 1, 1)
            if grid == "resid_pre":
                logits = model(_patch_variants(x, src, cell_ix, axes, n_var), start_at_layer=layer)
            else:
                def hook(act, hook, c=cell_ix, s=src, n=n_var):
                    return _patch_variants(act, s, c, axes, n)
                logits = model.run_with_hooks(x, start_at_layer=layer, fwd_hooks=[(names[layer], hook)])
            logits = logits.view(n_var, B, *logits.shape[1:])
            out[layer, start : start + n_var] = torch.stack([metric(lg) for lg in logits]).float()
    full = torch.full((cfg.n_layers, len(all_cells)), float(metric(model(base))))
    full[:, live] = out[:, : len(live)]
    shape = [cfg.n_layers] + [T if a == "pos" else cfg.n_heads for a in axes[1:]]
    return full.view(shape)


class _PrefixReuse:
    """Exact head x position patching that recomputes only what a patch can change.

    Patching head h's ``hook_z`` at layer l and position p leaves every layer below l and, with
    causal attention, every position before p as in the base run. So each patched variant starts
    from the base run's residual stream at layer l, recomputes positions p.. only, and attends to
    the base run's cached keys and values for positions before p. It runs the model's own weights
    (:mod:`tsds_interp.forward`, which refuses models it does not reproduce exactly); results equal
    the hooked model's to float rounding (tested against ``transformer_lens.patching``).
    """
    def __init__(self, model):
        self.own = OwnWeights(model)
        self.cfg = model.cfg

    def _run(self, tokens: Tensor) -> tuple[list, list, list, list, Tensor]:
        x = self.own.embed(tokens)
        resid, ks, vs, zs = [], [], [], []
        for layer in range(self.cfg.n_layers):
            resid.append(x)
            x, k, v, z = self.own.block(x, layer)
            ks.append(k), vs.append(v), zs.append(z)
        return resid, ks, vs, zs, self.own.unembed(x)

    def _heads_per_batch(self, B: int, T: int, memory_mb: float) -> int:
        return max(1, min(self.cfg.n_heads, int(memory_mb * 2**20 // _bytes_per_variant(self.cfg, B, T))))

    @torch.no_grad()
    def head_pos(self, base: Tensor, source: Tensor, metric: Metric, memory_mb: float) -> Tensor:
        n_heads, n_layers = self.cfg.n_heads, self.cfg.n_layers
        self.resid, self.ks, self.vs, _, self.base_logits = self._run(base)
        self.src_z = self._run(source)[3]
        B, T = base.shape
        out = torch.full((n_layers, T, n_heads), float(metric(self.base_logits)))
        differs = (base != source).any(0).nonzero()
        first = int(differs[0]) if len(differs) else T
        chunk = self._heads_per_batch(B, T, memory_mb)
        for layer in range(n_layers):
            for pos in range(first, T):
                for start in range(0, n_heads, chunk):
                    heads = torch.arange(start, min(start + chunk, n_heads))
                    out[layer, pos, heads] = self._variants(layer, pos, heads, metric)
        return out

    def _variants(self, layer: int, pos: int, heads: Tensor, metric: Metric) -> Tensor:
        """The metric with each of ``heads`` at (``layer``, ``pos``) taking the source's output."""
        n, (B, T) = len(heads), self.base_logits.shape[:2]

        def rep(t):
            return t.repeat(n, *([1] * (t.dim() - 1)))
        rows = torch.arange(n)

        def patch(z):  # variant i takes the source's head heads[i] at pos
            z = z.clone().view(n, B, *z.shape[1:])
            z[rows, :, heads, 0] = self.src_z[layer][:, heads, pos].permute(1, 0, 2)
            return z.view(-1, *z.shape[2:])

        def prefix(layer):  # the base run's keys and values before pos
            k_prefix, v_prefix = rep(self.ks[layer][:, :, :pos]), rep(self.vs[layer][:, :, :pos])
            return lambda k, v: (torch.cat([k_prefix, k], 2), torch.cat([v_prefix, v], 2))
        x = self.own.block(rep(self.resid[layer][:, pos:]), layer, prefix(layer), patch, start=pos)[0]
        for later in range(layer + 1, self.cfg.n_layers):
            x = self.own.block(x, later, prefix(later), start=pos)[0]
        logits = torch.cat([rep(self.base_logits[:, :pos]), self.own.unembed(x)], 1).view(n, B, T, -1)
        return torch.stack([metric(lg) for lg in logits]).float()


# ---------------------------------------------------------------- attribution patching

def _reduce_cells(x: Tensor, grid: str) -> Tensor:
    """(delta * grad) summed over features (and positions for ``head``), batch summed."""
    if grid == "head":
        return x.sum((0, 1, 3))
    if grid == "head_pos":
        return x.sum((0, 3))
    return x.sum((0, 2))


def attribution_patch(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                      metric: Metric, grid: str = "head", direction: Direction = "denoise",
                      ig_steps: int = 1) -> Tensor:
    """First-order estimate of :func:`activation_patch` minus the base run's metric, same shape."""
    clean, corrupted = checks.contrast(model, clean, corrupted, direction)
    check_grid(grid)
    metric = checks.metric(metric, differentiable=True)
    checks.number("ig_steps", ig_steps, lo=1, hi=1000, integer=True)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    names = [hook_name(grid, layer) for layer in range(model.cfg.n_layers)]
    check_hook_names(model, names)
    if grid in ("head", "head_pos") and ig_steps == 1 and use_own_weights(model, f"{grid} attribution patching"):
        return _own_head_attribution(model, base, source, metric, grid)
    with torch.no_grad():
        _, src_cache = model.run_with_cache(source, names_filter=lambda n: n in names)
        _, base_cache = model.run_with_cache(base, names_filter=lambda n: n in names)
    grads = {n: torch.zeros_like(base_cache[n]) for n in names}
    if ig_steps == 1:
        _accumulate_grads(model, base, metric, {n: None for n in names}, grads, 1.0)
    else:
        for n in names:
            for k in range(ig_steps):
                alpha = (k + 0.5) / ig_steps
                point = base_cache[n] + alpha * (src_cache[n] - base_cache[n])
                _accumulate_grads(model, base, metric, {n: point}, grads, 1.0 / ig_steps)
    per_layer = [_reduce_cells((src_cache[n] - base_cache[n]) * grads[n], grid) for n in names]
    return torch.stack(per_layer)


def _own_head_attribution(model, base: Tensor, source: Tensor, metric: Metric, grid: str) -> Tensor:
    """Attribution patching of the heads' outputs on the model's own weights: one forward of the
    source, one forward and backward of the base (gradients of the metric with respect to every
    head output ``z``, through every later layer; no parameter gradient is computed)."""
    own = OwnWeights(model)
    with torch.no_grad():
        x = own.embed(source)
        src_z = []
        for layer in range(model.cfg.n_layers):
            x, _, _, z = own.block(x, layer)
            src_z.append(z)
    with torch.enable_grad():
        x = own.embed(base).detach().requires_grad_()  # a graph to the heads even for frozen weights
        base_z = []
        for layer in range(model.cfg.n_layers):
            x, _, _, z = own.block(x, layer)
            base_z.append(z)
        grads = torch.autograd.grad(metric(own.unembed(x)), base_z)
    return torch.stack([_reduce_cells(((s - z.detach()) * g).transpose(1, 2), grid)  # [batch, pos, head, d_head]
                        for s, z, g in zip(src_z, base_z, grads)])


def _accumulate_grads(model, tokens, metric, replace: dict[str, Tensor | None], grads: dict, scale):
    """One forward/backward with backward hooks on ``replace``'s names; a non-None value replaces
    that activation. Adds ``scale * d metric / d activation`` into ``grads``; leaves no hook and
    no parameter gradient behind."""
    saved = [(p, p.grad) for p in model.parameters()]

    def fwd(act, hook, value=None):
        return act if value is None else act + (value - act).detach()  # value, gradient of act

    def bwd(grad, hook, name=None):
        grads[name] += scale * grad.detach()

    fwd_hooks = [(n, lambda a, hook, v=v: fwd(a, hook, v)) for n, v in replace.items() if v is not None]
    bwd_hooks = [(n, lambda g, hook, n=n: bwd(g, hook, n)) for n in replace]
    try:  # model.hooks removes exactly the hooks it added, also when the metric raises
        with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            metric(model(tokens)).backward()
    finally:
        for p, g in saved:
            p.grad = g


# ---------------------------------------------------------------- tidy results

def normalized(values: Tensor, clean_value: float, corrupted_value: float, direction: Direction,
               attribution: bool = False) -> Tensor:
    """0 = corrupted run, 1 = clean run. Attribution scores are changes from the base run."""
    base = corrupted_value if direction == "denoise" else clean_value
    v = values + base if attribution else values
    return (v - corrupted_value) / (clean_value - corrupted_value)


def to_frame(values: Tensor, grid: str, **labels) -> pd.DataFrame:
    axes = GRIDS[grid][1]
    idx = pd.MultiIndex.from_tuples(list(np.ndindex(*values.shape)), names=list(axes))
    df = pd.DataFrame({"value": values.flatten().numpy()}, index=idx).reset_index()
    df.insert(0, "grid", grid)
    for k, v in reversed(labels.items()):
        df.insert(0, k, v)
    return df


GRANULARITY_GRIDS = {"layer": ("attn_out", "mlp_out"), "head": ("head",), "head_pos": ("head_pos",),
                     "edge": ("edge",)}


MAX_PAIRS = 10_000


def check_patching_args(function: str, method: str, granularity: str, direction: str, n_pairs: int,
                        seed: int, memory_mb: float, ig_steps: int) -> None:
    """``ValueError`` naming the first setting of :func:`run_patching` outside its accepted values."""
    for name, value, allowed in (("function", function, ("decision", "sampling")),
                                 ("method", method, ("activation", "attribution")),
                                 ("granularity", granularity, tuple(GRANULARITY_GRIDS)),
                                 ("direction", direction, ("denoise", "noise"))):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    checks.number("n_pairs", n_pairs, lo=1, hi=MAX_PAIRS, integer=True)
    checks.seed(seed)
    checks.number("memory_mb", memory_mb, lo=0, hi=1e7, lo_open=True)
    checks.number("ig_steps", ig_steps, lo=1, hi=1000, integer=True)


def run_patching(model, function: str, method: str = "activation", granularity: str = "head",
                 n_pairs: int = 32, seed: int = 0, direction: str = "denoise", memory_mb: float = 256,
                 cells: str = "auto", pairs: Pairs | None = None, n_boot: int = 1000, ig_steps: int = 1
                 ) -> pd.DataFrame:
    """Tidy patching scores for one function ('decision' or 'sampling').

    ``effect``: change of the metric from the base run (corrupted run when denoising); ``value``:
    the normalized score (0 = corrupted run, 1 = clean run), NaN when the clean - corrupted gap's
    95% bootstrap interval (``gap_lo``, ``gap_hi``) includes 0, where normalizing divides by noise.
    ``granularity="edge"``: one row per edge (``source``, ``target``; :mod:`tsds_interp.edges`), exact
    single-edge path patching (activation) or edge attribution with ``ig_steps`` (attribution).
    """
    check_patching_args(function, method, granularity, direction, n_pairs, seed, memory_mb, ig_steps)
    pairs = pairs or make_pairs(model, function, n_pairs, seed, cells)
    with torch.no_grad():
        clean_v = float(pairs.metric(model(pairs.clean)))
        corr_v = float(pairs.metric(model(pairs.corrupted)))
    gap, lo, hi = pairs.gap(model, n_boot=n_boot, seed=seed)
    defined = bool(lo > 0 or hi < 0)
    base_v = corr_v if direction == "denoise" else clean_v
    frames = []
    for grid in GRANULARITY_GRIDS[granularity]:
        if grid == "edge":
            df = edge_attribution(model, pairs.clean, pairs.corrupted, pairs.metric, direction, ig_steps)
            if method == "activation":
                df["score"] = edge_patch(model, pairs.clean, pairs.corrupted, pairs.metric,
                                         list(zip(df.source, df.target)), direction).effect.to_numpy()
            effect = torch.tensor(df.score.to_numpy())
            norm = normalized(effect, clean_v, corr_v, direction, attribution=True)
            df = df.drop(columns="score").assign(function=function, method=method, grid="edge",
                                                 value=norm.numpy() if defined else float("nan"))
            df["effect"] = effect.numpy()
        elif method == "activation":
            raw = activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, grid, direction,
                                   memory_mb=memory_mb)
            effect = raw - base_v
        else:
            raw = attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, grid, direction, ig_steps)
            effect = raw
        if grid != "edge":
            norm = normalized(raw, clean_v, corr_v, direction, attribution=method == "attribution")
            df = to_frame(norm if defined else torch.full_like(norm, float("nan")), grid, function=function,
                          method=method)
            df["effect"] = effect.flatten().numpy()
        df["clean_metric"], df["corrupted_metric"] = clean_v, corr_v
        df["gap"], df["gap_lo"], df["gap_hi"], df["normalized_defined"] = gap, lo, hi, defined
        df["pairs"], df["own_wrong_pairs"] = len(pairs), pairs.origin.count("model")
        df["cells"], df["cell_rule"] = ",".join(pairs.cells), pairs.cell_rule
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def component_name(row) -> str:
    """The label of a tidy patching row (one of ``df.itertuples()``): ``L0H1``, ``L0.attn``, ``L0.mlp``
    or ``L0.resid`` (``@pos`` per position), or ``source->target`` for an edge."""
    if row.grid == "edge":
        return f"{row.source}->{row.target}"
    kind = {"attn_out": "attn", "mlp_out": "mlp", "resid_pre": "resid"}.get(row.grid, "head")
    name = Component(kind, int(row.layer), int(row.head) if kind == "head" else None).label
    pos = getattr(row, "pos", None)
    return name if pos is None or pd.isna(pos) else f"{name}@{int(pos)}"


def top_components(df: pd.DataFrame, k: int = 8) -> pd.DataFrame:
    """The ``k`` cells with the largest |effect| per function (the normalized score where defined)."""
    df = df.copy()
    df["component"] = [component_name(r) for r in df.itertuples()]
    df["abs"] = df.effect.abs()
    return (df.sort_values("abs", ascending=False).groupby("function", sort=False).head(k)
            [["function", "component", "effect", "value"]].reset_index(drop=True))


def gap_line(part: pd.DataFrame) -> str:
    """One line on a function's contrast: its gap, interval, pairs and cells, and whether normalizing is defined."""
    r = part.iloc[0]
    own = f", {r.own_wrong_pairs} with the model's own wrong sample" if r.function == "decision" else ""
    verdict = ("normalized scores shown" if r.normalized_defined else
               "the interval includes 0: normalized scores are undefined, raw effects only")
    return (f"{r.function}: clean - corrupted metric {r.gap:.3f} [{r.gap_lo:.3f}, {r.gap_hi:.3f}] over "
            f"{r.pairs} pairs{own}; cells {r.cells} ({r.cell_rule}); {verdict}")
