"""Edge attribution patching: which connections between components carry a function.

Nodes: ``embed`` (token embedding), each head ``L{l}H{h}`` and MLP ``L{l}.mlp``, and ``logits``.
An edge u -> v is the part of v's input that is u's output: every upstream node writes into the
residual stream (a head: ``z_h @ W_O[h]``; an MLP: ``hook_mlp_out``; ``embed``: ``hook_embed``) and
every downstream node reads the stream at its layer (a head through ``ln1`` and its own rows of
``W_Q``, ``W_K``, ``W_V``; an MLP through ``ln2``; the logits through ``ln_final``).

:func:`edge_attribution` scores every edge at once as ``(o_u(source) - o_u(base)) . d metric / d
input_v`` (summed over batch and positions), from one run of each side and one backward pass: a
receiver's input gradient is read from zero-valued leaves added to its private input (an MLP's
``ln2`` input, the final norm's input) or, for a head, from leaves on its queries, keys and values
pulled back through its weights and ``ln1``. With ``ig_steps > 1`` the gradients are averaged
along the straight line from the base run's token embeddings to the source's (one pass per step).
:func:`edge_patch` is the exact counterpart for chosen edges: the base run with u's source output
difference added to v's input only, everything downstream recomputed.

Exact for pre-norm transformers with LayerNorm, LNPre or no norm, standard positional embeddings,
one key/value head per query head and sequential attention and MLP; other models are refused.
"""

from __future__ import annotations

from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jaxtyping import Float, Int  # noqa: E402
from torch import Tensor  # noqa: E402

from tsds_interp import checks  # noqa: E402
from tsds_interp.components import Component, components  # noqa: E402

Metric = Callable[[Tensor], Tensor]


def nodes(model) -> tuple[list[Component], list[Component]]:
    """(upstream writers, downstream readers) in layer order."""
    inner = components(model)
    return [Component("embed", -1), *inner], [*inner, Component("logits", model.cfg.n_layers)]


def feeds(u: Component, v: Component) -> bool:
    """Whether u's output reaches v's input directly (v reads the residual stream after u writes)."""
    if v.kind == "logits" or u.kind == "embed":
        return True
    if v.kind == "mlp":
        return u.layer < v.layer or (u.layer == v.layer and u.kind == "head")
    return u.layer < v.layer


def check_supported(model) -> None:
    """Refuse models whose computation this module does not reproduce exactly."""
    cfg = model.cfg
    rules = {"normalization_type": ("LN", "LNPre", None), "positional_embedding_type": ("standard",),
             "n_key_value_heads": (None,), "parallel_attn_mlp": (False, None), "attn_only": (False, None),
             "final_rms": (False, None)}
    for key, allowed in rules.items():
        value = getattr(cfg, key, None)
        if value not in allowed:
            raise ValueError(f"edge attribution supports {key} in {allowed}, this model has {value!r}")


def _norm(model, x: Tensor, name: str) -> Tensor:
    kind = model.cfg.normalization_type
    if kind is None:
        return x
    sd = model.state_dict()
    w = sd.get(f"{name}.weight") if kind == "LN" else None
    b = sd.get(f"{name}.bias") if kind == "LN" else None
    return F.layer_norm(x, x.shape[-1:], w, b, model.cfg.eps)


def writer_outputs(model, cache) -> Float[Tensor, "writer batch pos d_model"]:
    """Each writer's contribution to the residual stream (biases of ``W_O`` excluded: they cancel
    in differences)."""
    outs = [cache["hook_embed"]]
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        outs += list(torch.einsum("bphe,hed->hbpd", z, model.W_O[layer]))
        outs.append(cache[f"blocks.{layer}.hook_mlp_out"])
    return torch.stack(outs)


def _names(model) -> list[str]:
    L = model.cfg.n_layers
    return (["hook_embed"] + [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
            + [f"blocks.{layer}.hook_mlp_out" for layer in range(L)]
            + [f"blocks.{layer}.ln1.hook_in" for layer in range(L)])


def reader_grads(model, tokens: Int[Tensor, "batch pos"], metric: Metric, embed: Tensor | None = None
                 ) -> Float[Tensor, "reader batch pos d_model"]:
    """d metric / d (each reader's private input), readers in :func:`nodes` order; ``embed``
    replaces the token embeddings (for integrated gradients)."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    leaves: dict[str, Tensor] = {}
    resid: dict[int, Tensor] = {}

    def add_leaf(act, hook, key):
        leaves[key] = torch.zeros_like(act, requires_grad=True)
        return act + leaves[key]

    def keep_resid(act, hook, layer):
        resid[layer] = act.detach()
        return act

    hooks = [] if embed is None else [("hook_embed", lambda a, hook: embed.to(a.dtype))]
    for layer in range(L):
        hooks.append((f"blocks.{layer}.ln1.hook_in", lambda a, hook, layer=layer: keep_resid(a, hook, layer)))
        for m in "qkv":
            hooks.append((f"blocks.{layer}.attn.hook_{m}", lambda a, hook, key=f"{m}{layer}": add_leaf(a, hook, key)))
        hooks.append((f"blocks.{layer}.ln2.hook_in", lambda a, hook, key=f"mlp{layer}": add_leaf(a, hook, key)))
    hooks.append(("ln_final.hook_in", lambda a, hook: add_leaf(a, hook, "logits")))
    saved = [(p, p.grad) for p in model.parameters()]
    try:
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            value = metric(model(tokens))
            keys = list(leaves)
            grads = dict(zip(keys, torch.autograd.grad(value, [leaves[k] for k in keys])))
    finally:
        for p, g in saved:
            p.grad = g
    out = []
    for layer in range(L):
        post = sum(torch.einsum("bphe,hde->hbpd", grads[f"{m}{layer}"], w[layer])
                   for m, w in (("q", model.W_Q), ("k", model.W_K), ("v", model.W_V)))
        x = resid[layer].expand(H, *resid[layer].shape).clone().requires_grad_(True)
        with torch.enable_grad():
            (g_in,) = torch.autograd.grad(_norm(model, x, f"blocks.{layer}.ln1"), x, post)
        out += list(g_in) + [grads[f"mlp{layer}"]]
    out.append(grads["logits"])
    return torch.stack(out)


def edge_attribution(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"],
                     metric: Metric, direction: str = "denoise", ig_steps: int = 1) -> pd.DataFrame:
    """First-order change of the metric from patching each edge alone (source output into the base
    run's receiver): one row per edge (``source``, ``target``, ``score``), valid edges only."""
    check_supported(model)
    clean, corrupted = checks.contrast(model, clean, corrupted, direction)
    checks.number("ig_steps", ig_steps, lo=1, hi=1000, integer=True)
    metric = checks.metric(metric, differentiable=True)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    names = _names(model)
    with torch.no_grad():
        _, src = model.run_with_cache(source, names_filter=lambda n: n in names)
        _, bas = model.run_with_cache(base, names_filter=lambda n: n in names)
        delta = writer_outputs(model, src) - writer_outputs(model, bas)
    if ig_steps == 1:
        grads = reader_grads(model, base, metric)
    else:
        e0, e1 = bas["hook_embed"], src["hook_embed"]
        grads = sum(reader_grads(model, base, metric, e0 + (k + 0.5) / ig_steps * (e1 - e0))
                    for k in range(ig_steps)) / ig_steps
    scores = torch.einsum("ubpd,vbpd->uv", delta.double(), grads.double()).float()
    writers, readers = nodes(model)
    rows = [dict(source=u.label, target=v.label, score=float(scores[i, j]))
            for i, u in enumerate(writers) for j, v in enumerate(readers) if feeds(u, v)]
    return pd.DataFrame(rows)


@torch.no_grad()
def edge_patch(model, clean: Int[Tensor, "batch pos"], corrupted: Int[Tensor, "batch pos"], metric: Metric,
               edges: list[tuple[str, str]], direction: str = "denoise") -> pd.DataFrame:
    """Exact path patching of single edges: the base run with the source run's output difference of
    u added to v's input only (for a head: its own queries, keys and values), everything after v
    recomputed. One row per edge with the change of the metric from the base run (``effect``)."""
    check_supported(model)
    clean, corrupted = checks.contrast(model, clean, corrupted, direction)
    metric = checks.metric(metric)
    if isinstance(edges, str) or not all(isinstance(e, tuple | list) and len(e) == 2 for e in edges):
        raise ValueError("edges must be a list of (source, target) label pairs, e.g. [('L0H1', 'L2.mlp')]")
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    names = _names(model)
    _, src = model.run_with_cache(source, names_filter=lambda n: n in names)
    _, bas = model.run_with_cache(base, names_filter=lambda n: n in names)
    delta = writer_outputs(model, src) - writer_outputs(model, bas)
    writers, readers = nodes(model)
    w_ix = {u.label: i for i, u in enumerate(writers)}
    r_by = {v.label: v for v in readers}
    base_value = float(metric(model(base)))
    rows = []
    for u_name, v_name in edges:
        if u_name not in w_ix or v_name not in r_by:
            raise ValueError(f"unknown edge {u_name} -> {v_name}; nodes are embed, L0H1, L2.mlp, logits, ...")
        u, v = writers[w_ix[u_name]], r_by[v_name]
        if not feeds(u, v):
            raise ValueError(f"{u_name} does not feed {v_name}: an edge runs from an earlier to a later component")
        hooks = _receiver_hooks(model, v, delta[w_ix[u_name]])
        value = float(metric(model.run_with_hooks(base, fwd_hooks=hooks)))
        rows.append(dict(source=u_name, target=v_name, effect=value - base_value))
    return pd.DataFrame(rows)


def _receiver_hooks(model, v: Component, d: Tensor) -> list:
    if v.kind == "logits":
        return [("ln_final.hook_in", lambda a, hook: a + d)]
    if v.kind == "mlp":
        return [(f"blocks.{v.layer}.ln2.hook_in", lambda a, hook: a + d)]
    layer, h = v.layer, v.head
    seen: dict[str, Tensor] = {}

    def read(a, hook):
        seen["x"] = _norm(model, a + d, f"blocks.{layer}.ln1")
        return a

    def qkv(a, hook, w, b):
        a = a.clone()
        a[:, :, h] = seen["x"] @ w[layer, h] + b[layer, h]
        return a

    return [(f"blocks.{layer}.ln1.hook_in", read)] + [
        (f"blocks.{layer}.attn.hook_{m}", lambda a, hook, w=w, b=b: qkv(a, hook, w, b))
        for m, w, b in (("q", model.W_Q, model.b_Q), ("k", model.W_K, model.b_K), ("v", model.W_V, model.b_V))]


def prune(edges: pd.DataFrame, top: int = 12) -> pd.DataFrame:
    """The ``top`` edges by |score|."""
    return edges.reindex(edges.score.abs().sort_values(ascending=False).index).head(top)


def draw_graph(edges: pd.DataFrame, model, path, title: str = "circuit") -> None:
    """Nodes by layer (bottom: embed, top: logits); each edge an arrow from source to target, width
    ~ |score|, red where it raises the metric and blue where it lowers it, curved so that edges
    along one column stay apart. Nodes on a drawn edge are black and labelled, the rest grey."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch

    writers, readers = nodes(model)
    H = model.cfg.n_heads
    pos = {}
    for n in {*writers, *readers}:
        x = {"embed": H / 2, "logits": H / 2, "mlp": H + 0.6}.get(n.kind, n.head if n.head is not None else 0)
        y = n.layer + (0.5 if n.kind == "mlp" else 0)
        pos[n.label] = (x, y)
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    lim = edges.score.abs().max() or 1.0
    for k, r in enumerate(edges.itertuples()):
        arrow = FancyArrowPatch(pos[r.source], pos[r.target], arrowstyle="-|>", mutation_scale=10,
                                connectionstyle=f"arc3,rad={0.15 + 0.05 * (k % 3)}", shrinkA=7, shrinkB=7,
                                color="tab:red" if r.score > 0 else "tab:blue", lw=0.5 + 4 * abs(r.score) / lim,
                                alpha=0.75, zorder=1)
        ax.add_patch(arrow)
    used = set(edges.source) | set(edges.target)
    for name, (x, y) in pos.items():
        on = name in used
        ax.scatter(x, y, s=200 if on else 40, color="black" if on else "lightgrey", zorder=2)
        ax.annotate(name, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=8 if on else 6,
                    color="black" if on else "grey")
    ax.set_yticks(np.arange(-1, model.cfg.n_layers + 1), ["embed", *range(model.cfg.n_layers), "logits"])
    ax.set_ylabel("layer")
    ax.set_xticks([])
    ax.set_xlim(-0.8, H + 1.6)
    ax.legend(handles=[Line2D([], [], color="tab:red", lw=2, label="raises the metric"),
                       Line2D([], [], color="tab:blue", lw=2, label="lowers it"),
                       Line2D([], [], color="grey", lw=0.5, label=f"width ~ |score| (max {lim:.3g})")],
              loc="lower right", fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
