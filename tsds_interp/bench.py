"""``python -m tsds_interp.bench [ENTRY ...] [--json FILE] [--quick]``: side-by-side speed ratios.

Entries: ``rollout`` (our KV-cached reflective sampler vs TransformerLens ``generate``), ``train``
(the training loop's step vs a plain PyTorch model of the same architecture with fused attention;
the hooked step is reported too), ``patching`` (exact
and attribution head x position sweeps vs ``transformer_lens.patching``), ``patching_hf`` (the same
on HuggingFace GPT-2 and Llama layouts), ``generate_hf`` (sampling from those models vs the bridge's
``generate``), ``patching_matrix`` (exact patching on every native configuration of
``LAYOUT_MATRIX``, fast or hooked path, vs TransformerLens). Each comparison runs
both sides alternately in one process, several times, and reports medians; ``ratio`` is always
reference time / ours except for ``train`` (ours / reference: lower is better there).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tsds_interp.model import ModelConfig, build_model, load, shipped_names


def _timed(fns: dict[str, Callable[[], object]], repeats: int, raw: dict | None = None) -> dict[str, float]:
    """Median seconds of each function, run alternately after one warm-up call each, the order
    rotated every repeat so no function always follows the same one (every time into ``raw``)."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in names[i % len(names):] + names[: i % len(names)]:
            f = fns[k]
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    if raw is not None:
        raw.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


def _paired_ratios(raw: dict[str, list[float]], ours: str, reference: str) -> list[float]:
    """Per-repeat ratios ours / reference (neighbouring runs share the machine's load)."""
    return sorted(a / b for a, b in zip(raw[ours], raw[reference]))


def _bench_model():
    """The shipped RL model when there is one, else a freshly built small model."""
    if "rl" in shipped_names():
        return load("rl"), "shipped rl"
    return build_model(ModelConfig()), "untrained small config"


# ---------------------------------------------------------------- rollout

def bench_rollout(quick: bool) -> dict:
    from tsds_interp.rollout import rollout
    from tsds_interp.task import prompt_tokens, sample_questions

    model, which = _bench_model()
    task = model.tsds_config.task
    batch = 64 if quick else 256
    q = sample_questions(task, "test", batch, seed=0)
    prompts = prompt_tokens(q.a, q.b, task)
    new = task.budget * task.attempt_len
    ours_tokens = {}

    def ours():
        r = rollout(model, q, temperature=1.0, seed=0)
        ours_tokens["n"] = int((r.roles[:, task.prompt_len:] <= 3).sum())

    def tl_generate(cache: bool):
        return lambda: model.generate(prompts, max_new_tokens=new, stop_at_eos=False, do_sample=True,
                                      temperature=1.0, use_past_kv_cache=cache, verbose=False)

    t = _timed({"ours": ours, "tl_cache": tl_generate(True), "tl_nocache": tl_generate(False)},
               2 if quick else 5)
    ref_name = min(("tl_cache", "tl_nocache"), key=t.get)
    ours_tps = ours_tokens["n"] / t["ours"]
    ref_tps = batch * new / t[ref_name]
    return {"rollout": {
        "ours_s": t["ours"], "reference_s": t[ref_name], "ratio": ours_tps / ref_tps,
        "ours_tokens_per_s": ours_tps, "reference_tokens_per_s": ref_tps,
        "wall_ratio": t[ref_name] / t["ours"],
        "reference": f"TransformerBridge.generate ({ref_name.replace('tl_', '')} KV cache, the faster; "
                     f"cache {t['tl_cache']:.3f}s, no cache {t['tl_nocache']:.3f}s), {new} new tokens "
                     f"x {batch} rows; ours stops episodes at ACCEPT, so ratio is tokens/s",
        "model": which, "batch": batch}}


# ---------------------------------------------------------------- train

class PlainTransformer(nn.Module):
    """The hooked model's architecture in plain PyTorch, attention explicit or fused."""
    def __init__(self, state: dict[str, torch.Tensor], cfg, fused: bool = False):
        super().__init__()
        self.params = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.clone())
                                        for k, v in state.items()})
        self.cfg, self.fused = cfg, fused

    def w(self, name):
        return self.params[name.replace(".", "__")]

    def _ln(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.w(f"{name}.weight"), self.w(f"{name}.bias"), 1e-5)

    def _lin(self, x, name):
        return F.linear(x, self.w(f"{name}.weight"), self.w(f"{name}.bias"))

    def forward(self, tokens):
        n, t = tokens.shape
        h, dh = self.cfg.n_heads, self.cfg.d_head
        x = self.w("embed.weight")[tokens] + self.w("pos_embed.weight")[:t]
        mask = torch.ones(t, t, dtype=torch.bool).triu(1)
        for layer in range(self.cfg.n_layers):
            p = f"blocks.{layer}"
            y = self._ln(x, f"{p}.ln1")
            q, k, v = (self._lin(y, f"{p}.attn.{m}").view(n, t, h, dh).transpose(1, 2) for m in "qkv")
            if self.fused:
                z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(mask, float("-inf"))
                z = scores.softmax(-1) @ v
            x = x + self._lin(z.transpose(1, 2).reshape(n, t, -1), f"{p}.attn.o")
            y = self._ln(x, f"{p}.ln2")
            x = x + self._lin(F.gelu(self._lin(y, f"{p}.mlp.in")), f"{p}.mlp.out")
        return self._lin(self._ln(x, "ln_final"), "unembed")


def bench_train(quick: bool) -> dict:
    from tsds_interp.forward import OwnForward, use_own_weights
    from tsds_interp.train import adamw

    cfg = ModelConfig()
    hooked = build_model(cfg)
    hooked.train()
    own = build_model(cfg)
    assert use_own_weights(own, "bench"), "the small config should take the own-weights forward"
    batch, length = (64, 24) if quick else (256, 24)
    tokens = torch.randint(0, hooked.cfg.d_vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    plain = PlainTransformer(hooked.state_dict(), hooked.cfg)
    fused = PlainTransformer(hooked.state_dict(), hooked.cfg, fused=True)
    with torch.no_grad():
        assert torch.allclose(plain(tokens), hooked(tokens), atol=1e-4), "plain model differs"
        assert torch.allclose(OwnForward(own)(tokens), hooked(tokens), atol=1e-4), "own forward differs"

    def step(model, forward=None, optimizer=None):
        opt = (optimizer or torch.optim.AdamW)(model.parameters(), lr=1e-4)
        forward = forward or model

        def f():
            logits = forward(tokens)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    raw: dict[str, list[float]] = {}
    t = _timed({"ours": step(own, OwnForward(own), adamw), "ours_plain_adamw": step(own, OwnForward(own)),
                "hooked": step(hooked), "plain": step(plain), "fused": step(fused)}, 3 if quick else 15, raw)
    paired = _paired_ratios(raw, "ours", "fused")
    n_params = sum(p.numel() for p in hooked.parameters())
    return {"train": {
        "ours_s": t["ours"], "reference_s": t["fused"], "ratio": t["ours"] / t["fused"],
        "ratio_vs_fused_sdpa": t["ours"] / t["fused"],
        "paired_ratio_range": [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]],
        "forward_backward_ratio": t["ours_plain_adamw"] / t["fused"],
        "hooked_s": t["hooked"], "plain_s": t["plain"], "hooked_vs_plain": t["hooked"] / t["plain"],
        "reference": f"plain PyTorch model, same weights, fused scaled_dot_product_attention, torch's default "
                     f"AdamW; one step, batch {batch}x{length}, {n_params} parameters; ours = the training "
                     "loop's step (own-weights forward, fused AdamW); ratio = ours / reference (lower is better)"}}


# ---------------------------------------------------------------- patching

def bench_patching(quick: bool) -> dict:
    import transformer_lens.patching as tlp

    from tsds_interp.pairs import decision_pairs
    from tsds_interp.patching import activation_patch, attribution_patch

    model, which = _bench_model()
    pairs = decision_pairs(model, model.tsds_config.task, 8 if quick else 32, seed=0)
    _, clean_cache = model.run_with_cache(pairs.clean)
    silent = dict(disable=True)

    def reference():
        import tqdm as _tqdm
        orig = tlp.tqdm
        tlp.tqdm = lambda x, **k: _tqdm.tqdm(x, **silent)
        try:
            return tlp.get_act_patch_attn_head_out_by_pos(model, pairs.corrupted, clean_cache, pairs.metric)
        finally:
            tlp.tqdm = orig

    def exact():
        return activation_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head_pos")
    def attr():
        return attribution_patch(model, pairs.clean, pairs.corrupted, pairs.metric, "head_pos")
    max_diff = float((reference() - exact()).abs().max())
    t = _timed({"tl": reference, "exact": exact, "attr": attr}, 2 if quick else 5)
    common = f"transformer_lens.patching.get_act_patch_attn_head_out_by_pos, {len(pairs)} decision pairs"
    return {
        "activation": {"ours_s": t["exact"], "reference_s": t["tl"], "ratio": t["tl"] / t["exact"],
                       "reference": common, "max_abs_diff": max_diff, "model": which},
        "attribution": {"ours_s": t["attr"], "reference_s": t["tl"], "ratio": t["tl"] / t["attr"],
                        "reference": common, "model": which},
    }


# Native configurations that each compute something different (the test suite checks every one
# against TransformerLens): changes to a small base model of the width-1 task.
LAYOUT_MATRIX = {
    "native": {}, "d_head_6": dict(d_head=6), "one_layer_relu": dict(n_layers=1, act_fn="relu"),
    "gelu_new": dict(act_fn="gelu_new"), "attn_scale_2": dict(attn_scale=2.0),
    "score_soft_cap": dict(attn_scores_soft_cap=5.0), "logit_soft_cap": dict(output_logits_soft_cap=3.0),
    "bidirectional": dict(attention_dir="bidirectional"), "rms": dict(normalization_type="RMS"),
    "rms_pre": dict(normalization_type="RMSPre"), "ln_pre": dict(normalization_type="LNPre"),
    "no_norm": dict(normalization_type=None), "final_rms": dict(normalization_type="LN", final_rms=True),
    "ln_pre_final_rms": dict(normalization_type="LNPre", final_rms=True),
    "attn_only": dict(attn_only=True), "grouped_query": dict(n_key_value_heads=2),
    "multi_query": dict(n_key_value_heads=1), "gated_silu": dict(gated_mlp=True, act_fn="silu"),
    "swish": dict(act_fn="swish"), "solu": dict(act_fn="solu"),
    "rotary": dict(positional_embedding_type="rotary", rotary_dim=8),
    "rotary_partial": dict(positional_embedding_type="rotary", rotary_dim=4),
    "llama_like": dict(normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
                       n_key_value_heads=2, gated_mlp=True, act_fn="silu"),
}


def matrix_model(name: str, base: dict):
    """The ``LAYOUT_MATRIX`` configuration ``name`` on ``base``, booted natively, its norm weights moved
    off their identity initialisation (so, e.g., LayerNorm and its parameter-free form differ)."""
    import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_native)
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**base, **LAYOUT_MATRIX[name]}))
    model.eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "ln" in key or "norm" in key:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def bench_patching_matrix(quick: bool) -> dict:
    """Exact head x position patching on every configuration of ``LAYOUT_MATRIX`` (d_model 64, 2 layers,
    4 heads, 8 pairs of 20 tokens) against TransformerLens: the own-weights path where it is exact, the
    hooked path (soft caps, bidirectional attention, SoLU) elsewhere."""
    base = dict(d_model=64, d_head=16, n_heads=4, n_layers=2, n_ctx=32, d_vocab=20, act_fn="gelu", seed=0,
                model_name="matrix")
    n, T = (4, 12) if quick else (8, 20)
    clean = torch.randint(0, 20, (n, T), generator=torch.Generator().manual_seed(1))
    corrupted = clean.clone()
    corrupted[:, T // 3] = (corrupted[:, T // 3] + 1) % 20

    def metric(logits):
        return (logits[:, -1, 3] - logits[:, -1, 5]).mean()
    out = {}
    for name in LAYOUT_MATRIX:
        if name != "d_head_6":  # d_head 16 here: the base already covers d_head != d_model / n_heads
            out[name] = _tl_head_pos_case(matrix_model(name, base), clean, corrupted, metric, 2 if quick else 3)
    return out


def _tl_head_pos_case(model, clean: torch.Tensor, corrupted: torch.Tensor, metric, repeats: int,
                      attribution: bool = False) -> dict:
    """Our exact head x position patching against ``get_act_patch_attn_head_out_by_pos`` (and, with
    ``attribution``, our attribution patching against our exact patching as ``"attribution"``)."""
    import transformer_lens.patching as tlp

    from tsds_interp.forward import refusal
    from tsds_interp.patching import activation_patch, attribution_patch

    _, clean_cache = model.run_with_cache(clean)

    def reference():
        orig = tlp.tqdm
        tlp.tqdm = lambda x, **k: x
        try:
            return tlp.get_act_patch_attn_head_out_by_pos(model, corrupted, clean_cache, metric)
        finally:
            tlp.tqdm = orig

    def ours():
        return activation_patch(model, clean, corrupted, metric, "head_pos")

    def attr():
        return attribution_patch(model, clean, corrupted, metric, "head_pos")
    fns = {"tl": reference, "ours": ours, **({"attr": attr} if attribution else {})}
    raw: dict = {}
    t = _timed(fns, repeats, raw)
    path = refusal(model) or "own weights"
    out = {"ours_s": t["ours"], "reference_s": t["tl"], "ratio": t["tl"] / t["ours"],
           "paired_ratio_min": min(b / a for a, b in zip(raw["ours"], raw["tl"])),
           "max_abs_diff": float((reference() - ours()).abs().max()), "path": path,
           "reference": "transformer_lens.patching.get_act_patch_attn_head_out_by_pos"}
    if attribution:
        out["attribution"] = {"ours_s": t["attr"], "reference_s": t["ours"], "ratio": t["ours"] / t["attr"],
                              "paired_ratio_min": min(b / a for a, b in zip(raw["attr"], raw["ours"])),
                              "path": path, "reference": "our exact head x position patching of the same grid"}
    return out


HF_SIZE = dict(d_model=256, n_layers=4, n_heads=8, d_mlp=1024, n_ctx=64)
HF_WORDS = [f"w{i}" for i in range(60)] + ["ACCEPT", "REJECT"]


def _hf_model(arch: str):
    """A HuggingFace-layout model of ``HF_SIZE`` with random weights, written offline and booted."""
    import tempfile
    from pathlib import Path

    from tsds_interp.hf import boot, save_random

    return boot(save_random(arch, Path(tempfile.mkdtemp()) / arch, HF_WORDS, **HF_SIZE))


def bench_patching_hf(quick: bool) -> dict:
    """Head x position patching of HuggingFace-layout models (GPT-2, Llama): exact patching against
    TransformerLens, and attribution patching against exact patching of the same grid."""
    out = {}
    for arch in ("gpt2", "llama"):
        out[arch], out[f"{arch}_attribution"] = _hf_patching_case(arch, quick)
    return out


def _hf_patching_case(arch: str, quick: bool) -> tuple[dict, dict]:
    n, T = (4, 24) if quick else (8, 40)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(3, len(HF_WORDS), (n, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, T // 2] = (corrupted[:, T // 2] + 1) % len(HF_WORDS)

    def metric(logits):
        return (logits[:, -1, 4] - logits[:, -1, 5]).mean()
    exact = _tl_head_pos_case(_hf_model(arch), clean, corrupted, metric, 2 if quick else 3, attribution=True)
    attr = exact.pop("attribution")
    grid = f"{n} pairs of {T} tokens, d_model 256, 4 layers, 8 heads"
    exact["reference"] += f", {grid}"
    attr["reference"] += f", {grid}"
    return exact, attr


def bench_generate_hf(quick: bool) -> dict:
    """Sampling continuations of HuggingFace-layout models (GPT-2, Llama): :func:`tsds_interp.traces.generate`
    against the bridge's own ``generate`` (its key/value cache on), the same number of new tokens, for
    one row (interactive use: per-step overheads dominate) and a batch of 32 (matrix products dominate)."""
    prompt, new = (8, 16) if quick else (8, 48)
    out = {}
    for arch in ("gpt2", "llama"):
        model = _hf_model(arch)
        for n in (1, 32):
            out[f"{arch}_{n}_rows"] = _generate_case(model, n, prompt, new, 2 if quick else 5)
    return out


def _generate_case(model, n: int, prompt: int, new: int, repeats: int) -> dict:
    from tsds_interp.forward import refusal
    from tsds_interp.traces import generate

    tokens = torch.randint(3, len(HF_WORDS), (n, prompt), generator=torch.Generator().manual_seed(0))

    def ours():
        return generate(model, tokens, new, stop_at_eos=False)

    def reference():
        return model.generate(tokens, max_new_tokens=new, stop_at_eos=False, use_past_kv_cache=True, verbose=False)
    assert ours()[0].shape == reference().shape
    raw: dict = {}
    t = _timed({"tl": reference, "ours": ours}, repeats, raw)
    return {"ours_s": t["ours"], "reference_s": t["tl"], "ratio": t["tl"] / t["ours"],
            "paired_ratio_min": min(b / a for a, b in zip(raw["ours"], raw["tl"])),
            "tokens_per_s": n * new / t["ours"], "reference_tokens_per_s": n * new / t["tl"],
            "path": refusal(model) or "own weights",
            "reference": f"TransformerBridge.generate(use_past_kv_cache=True), {n} rows x {new} new tokens"}


ENTRIES = {"rollout": bench_rollout, "train": bench_train, "patching": bench_patching, "patching_hf": bench_patching_hf,
           "generate_hf": bench_generate_hf, "patching_matrix": bench_patching_matrix}


if __name__ == "__main__":  # python -m tsds_interp.bench
    from tsds_interp.cli.bench import main

    sys.exit(main())
