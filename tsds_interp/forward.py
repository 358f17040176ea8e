"""The model's own weights, run directly: the one fast forward used by rollouts, patching and training.

A hooked forward pays for its hook points; running the same weights with plain tensor operations
(fused ``scaled_dot_product_attention``, fused multiply-add residuals, a key/value cache for
decoding) is several times faster. It is used only where it computes exactly what the hooked model computes:

- every field of the model's config is either known not to change the computation or holds a
  value this module implements (an allow-list: an unknown field or value refuses). Implemented:
  LayerNorm, RMSNorm and their parameter-free forms (or none), learned or rotary positions (full
  or partial rotary dimension), multi-head, grouped-query and multi-query attention, plain and
  gated MLPs, biases present or absent on every linear map, tied or untied unembedding, a final
  RMSNorm;
- the architecture is one whose layout this module knows (``LAYOUTS``: a native
  ``TransformerBridge.boot_native`` model, or GPT-2, Llama, Qwen2 or Mistral booted from
  HuggingFace), the weights have exactly the names that layout and config call for, and the
  HuggingFace config holds nothing the forward does not reproduce (a sliding window shorter than
  the context, dynamic rotary scaling, dropout while training, ...);
- no hook is attached to the model (a user's hook would be skipped).

:func:`refusal` says why a model is refused (``None``: accepted); every caller then falls back to
the hooked model and logs the choice on the ``tsds_interp`` logger at debug level.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

log = logging.getLogger("tsds_interp")


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "gelu_new": _gelu_tanh,
               "gelu_pytorch_tanh": _gelu_tanh}
NORMS = ("LN", "LNPre", "RMS", "RMSPre", None)
# Config fields whose value this module implements: the values it accepts, or a test of the value.
ACCEPTED = {
    "attention_dir": ("causal",), "normalization_type": NORMS, "positional_embedding_type": ("standard", "rotary"),
    "use_attn_scale": (True,), "n_devices": (1,),
    "attn_scores_soft_cap": (None, -1, 0), "output_logits_soft_cap": (None, -1, 0), "scale_embedding": (None, False),
    **dict.fromkeys(("use_local_attn", "is_audio_model", "is_multimodal", "is_stateful", "is_visual_model",
                     "load_in_4bit", "parallel_attn_mlp", "post_embedding_ln", "rmsnorm_uses_offset",
                     "scale_attn_by_inverse_layer_idx", "use_normalization_before_and_after", "use_NTK_by_parts_rope",
                     "use_qk_norm", "layer_norm_folding"), (False,)),
    **dict.fromkeys(("attn_only", "final_rms", "gated_mlp", "uses_rms_norm"), (False, True)),
    **dict.fromkeys(("attn_types", "window_size", "num_experts", "per_layer_head_dim",
                     "per_layer_num_key_value_heads", "experts_per_token"), (None,)),
}


@dataclass(frozen=True)
class Layout:
    """How an architecture stores what this module computes."""
    transposed: tuple[str, ...] = ()  # weights stored as (in, out) rather than torch's (out, in)
    rotary: str = "halves"            # rotary pairs: "adjacent" (2i, 2i+1) or "halves" (i, i + d/2)


LAYOUTS = {
    "TransformerLensNative": Layout(rotary="adjacent"),
    "GPT2LMHeadModel": Layout(transposed=("attn.o", "mlp.in", "mlp.out")),  # GPT-2's Conv1D
    "LlamaForCausalLM": Layout(), "Qwen2ForCausalLM": Layout(), "MistralForCausalLM": Layout(),
}
NATIVE = "TransformerLensNative"
TESTS = {
    "architecture": lambda v, c: v in LAYOUTS,
    "act_fn": lambda v, c: v in ACTIVATIONS,
    # -1: sqrt(d_head); a native model divides scores by any positive value it is given
    "attn_scale": lambda v, c: v == -1 or math.isclose(v, math.sqrt(c.d_head), rel_tol=1e-12)
                               or (c.architecture == NATIVE and v > 0),
    "d_vocab_out": lambda v, c: v in (-1, c.d_vocab),
    "dtype": lambda v, c: v == torch.float32,
    "n_key_value_heads": lambda v, c: v is None or (0 < v <= c.n_heads and c.n_heads % v == 0),
    "rotary_dim": lambda v, c: v is None or (0 < v <= c.d_head and v % 2 == 0),
}
# Config fields that do not change what the forward computes (sizes are read from the weights, the
# rotary frequencies from the model; NTK, relative-attention, vision and expert settings act only
# through fields checked above; a HuggingFace model's own config is checked by ``_hf_refusal``).
NEUTRAL = {
    "d_model", "d_head", "n_heads", "n_layers", "d_mlp", "d_vocab", "n_ctx", "eps", "seed", "device",
    "model_name", "n_params", "init_mode", "init_weights", "initializer_range", "from_checkpoint",
    "checkpoint_index", "checkpoint_label_type", "checkpoint_value", "tokenizer_name",
    "tokenizer_prepends_bos", "tokenizer_appends_eos", "default_prepend_bos", "default_padding_side",
    "trust_remote_code", "use_attn_in", "use_attn_result", "use_hook_mlp_in", "use_hook_tokens",
    "use_split_qkv_input", "split_attention_weights", "original_architecture", "decoder_start_token_id",
    "mm_tokens_per_image", "attn_implementation", "tie_word_embeddings", "rotary_base",
    "rotary_adjacent_pairs", "rotary_interleaved_cos_sin", "qk_norm_after_rope", "NTK_by_parts_factor",
    "NTK_by_parts_high_freq_factor", "NTK_by_parts_low_freq_factor", "relative_attention_max_distance",
    "relative_attention_num_buckets", "vision_hidden_size", "vision_num_heads", "vision_num_layers",
    "bos_token_id", "eos_token_id", "pad_token_id", "intermediate_size", "hidden_act", "layer_types",
    "rope_parameters", "attention_bias",
}
# HuggingFace rotary scalings whose frequencies do not depend on the sequence length.
STATIC_ROPE = ("default", "linear", "llama3")


def _norm_kinds(cfg) -> tuple[str | None, str | None]:
    """The blocks' norm and the final norm: ``"LN"``, ``"LNPre"``, ``"RMS"``, ``"RMSPre"`` or ``None``."""
    block = cfg.normalization_type
    if not getattr(cfg, "final_rms", False):
        return block, block
    return block, "RMSPre" if block in ("LNPre", "RMSPre") else "RMS"


def _norm_params(kind: str | None) -> tuple[str, ...]:
    return {"LN": ("weight", "bias"), "RMS": ("weight",)}.get(kind, ())


def weight_names(cfg) -> tuple[set[str], set[str]]:
    """The state-dict names a model of ``cfg`` must have, and the biases it may have."""
    block_norm, final_norm = _norm_kinds(cfg)
    linears = ["attn.q", "attn.k", "attn.v", "attn.o"]
    norms = ["ln1"]
    if not cfg.attn_only:
        linears += ["mlp.in", "mlp.out"] + (["mlp.gate"] if cfg.gated_mlp else [])
        norms.append("ln2")
    per_block = [f"{m}.weight" for m in linears] + [f"{n}.{p}" for n in norms for p in _norm_params(block_norm)]
    required = {"embed.weight", "unembed.weight", *(f"ln_final.{p}" for p in _norm_params(final_norm))}
    if cfg.positional_embedding_type == "standard":
        required.add("pos_embed.weight")
    required |= {f"blocks.{i}.{n}" for i in range(cfg.n_layers) for n in per_block}
    optional = {"unembed.bias"} | {f"blocks.{i}.{m}.bias" for i in range(cfg.n_layers) for m in linears}
    return required, optional


def hooks_attached(model) -> bool:
    """Whether a user's hook is attached: any hook on a hook point (TransformerLens's ``add_hook``,
    ``hooks()``, ``run_with_hooks``), any other module hook not installed by the libraries themselves
    (``LIBRARY_HOOK_MODULES``), or a global module hook."""
    from torch.nn.modules import module as nn_module
    from transformer_lens.hook_points import HookPoint

    if any(getattr(nn_module, g) for g in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                           "_global_backward_hooks", "_global_backward_pre_hooks")):
        return True
    for m in model.modules():
        hooks = [*m._forward_hooks.values(), *m._forward_pre_hooks.values(), *m._backward_hooks.values(),
                 *m._backward_pre_hooks.values()]
        if hooks and (isinstance(m, HookPoint) or any(not _library_hook(h) for h in hooks)):
            return True
    return False


# Hooks the libraries install themselves: TransformerLens's capture wiring, and HuggingFace's output
# capturing (it records outputs for ``output_attentions`` and the like, and changes nothing).
LIBRARY_HOOK_MODULES = ("transformer_lens.", "transformers.utils.output_capturing")


def _library_hook(fn) -> bool:
    return getattr(fn, "__module__", "").startswith(LIBRARY_HOOK_MODULES)


def refusal(model) -> str | None:
    """Why the own-weights forward would not reproduce ``model`` exactly; ``None`` when it does."""
    cfg = model.cfg
    fields = vars(cfg)
    for name in sorted(fields):
        if name.startswith("_") or name in NEUTRAL:
            continue
        value = fields[name]
        if name in ACCEPTED:
            ok = value in ACCEPTED[name]
        elif name in TESTS:
            ok = TESTS[name](value, cfg)
        else:
            return f"the config field {name} is not known to the own-weights forward"
        if not ok:
            return f"{name}={value!r} is not implemented by the own-weights forward"
    if getattr(cfg, "rope_scaling", None):  # a native model's rotary scaling
        return f"rope_scaling={cfg.rope_scaling!r} is not implemented by the own-weights forward"
    required, optional = weight_names(cfg)
    names = set(model.state_dict())
    odd = sorted((required - names) | (names - required - optional))
    if odd:
        return f"the weights are not those of the {cfg.architecture} layout ({odd[0]})"
    if cfg.architecture != NATIVE and (reason := _hf_refusal(model)):
        return reason
    if hooks_attached(model):
        return "hooks are attached to the model"
    return None


def _hf_refusal(model) -> str | None:
    """Why a HuggingFace model's own config would make it compute something else; ``None`` if nothing."""
    cfg, hf = model.cfg, model.original_model.config
    if getattr(hf, "pretraining_tp", 1) != 1:
        return f"pretraining_tp={hf.pretraining_tp} is not implemented by the own-weights forward"
    head_dim = getattr(hf, "head_dim", None) or cfg.d_head
    if head_dim != cfg.d_head:
        return f"head_dim={head_dim} differs from d_head={cfg.d_head}"
    eps = next((getattr(hf, k) for k in ("rms_norm_eps", "layer_norm_epsilon") if hasattr(hf, k)), cfg.eps)
    if eps != cfg.eps:
        return f"the norms' eps {eps} differs from the config's {cfg.eps}"
    act = getattr(hf, "hidden_act", None) or getattr(hf, "activation_function", None)
    if ACTIVATIONS.get(act) is not ACTIVATIONS[cfg.act_fn]:
        return f"hidden_act={act!r} differs from the bridge's act_fn={cfg.act_fn!r}"
    window = getattr(hf, "sliding_window", None)
    types = getattr(hf, "layer_types", None)
    if (window is not None and window < cfg.n_ctx and getattr(hf, "use_sliding_window", True)
            and (types is None or "sliding_attention" in types)):
        return f"sliding_window={window} is shorter than the context ({cfg.n_ctx})"
    if model.training:
        for name, value in sorted(hf.to_dict().items()):
            if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value > 0:
                return f"{name}={value} is active in training mode"
    if cfg.positional_embedding_type == "rotary":
        rope = _hf_rotary(model)
        if isinstance(rope, str):
            return rope
    return None


def _hf_rotary(model) -> nn.Module | str:
    """A HuggingFace model's one rotary-embedding module, or why it cannot be reproduced."""
    found = [m for m in model.original_model.modules() if "inv_freq" in m._buffers and hasattr(m, "rope_type")]
    if len(found) != 1:
        return f"{len(found)} rotary embedding modules (one shared module expected)"
    rope = found[0]
    if rope.rope_type not in STATIC_ROPE or getattr(rope, "attention_scaling", 1.0) != 1.0:
        return f"rope_type={rope.rope_type!r} rotary scaling is not implemented by the own-weights forward"
    if 2 * rope.inv_freq.numel() != model.cfg.d_head:
        dim = 2 * rope.inv_freq.numel()
        return f"a partial rotary dimension ({dim} of d_head={model.cfg.d_head}) is not implemented for this layout"
    return rope


def use_own_weights(model, what: str) -> bool:
    """Whether ``what`` (e.g. "rollout") may run the own-weights forward; logs the choice."""
    reason = refusal(model)
    log.debug("%s: %s", what, "own-weights forward" if reason is None else f"hooked forward ({reason})")
    return reason is None


class Rotary:
    """Rotary position embedding of the first ``dim`` features of each head, ``pairs`` as the layout
    pairs them; the cos/sin tables grow to the longest sequence seen."""
    def __init__(self, inv_freq: Float[Tensor, " half"], pairs: str):
        self.inv_freq, self.pairs, self.dim = inv_freq.float(), pairs, 2 * inv_freq.numel()
        self.cos = self.sin = torch.empty(0, self.dim, device=inv_freq.device)

    def _tables(self, end: int) -> tuple[Tensor, Tensor]:
        if end > len(self.cos):
            freqs = torch.outer(torch.arange(max(end, 2 * len(self.cos)), device=self.inv_freq.device).float(),
                                self.inv_freq)
            angles = freqs.repeat_interleave(2, -1) if self.pairs == "adjacent" else torch.cat([freqs, freqs], -1)
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos, self.sin

    def __call__(self, x: Float[Tensor, "batch head new d_head"], start: int) -> Tensor:
        """``x`` at positions ``start .. start + new``, rotated."""
        cos, sin = (t[start : start + x.shape[2]].to(x.dtype) for t in self._tables(start + x.shape[2]))
        r, rest = x[..., : self.dim], x[..., self.dim :]
        if self.pairs == "adjacent":
            turned = torch.stack([-r[..., 1::2], r[..., 0::2]], -1).flatten(-2)
        else:
            half = self.dim // 2
            turned = torch.cat([-r[..., half:], r[..., :half]], -1)
        r = r * cos + turned * sin
        return torch.cat([r, rest], -1) if rest.shape[-1] else r


def _rotary(model) -> Rotary | None:
    cfg = model.cfg
    if cfg.positional_embedding_type != "rotary":
        return None
    pairs = LAYOUTS[cfg.architecture].rotary
    if cfg.architecture != NATIVE:
        return Rotary(_hf_rotary(model).inv_freq, pairs)
    dim = cfg.rotary_dim or cfg.d_head
    device = model.state_dict()["embed.weight"].device
    return Rotary(1.0 / float(cfg.rotary_base) ** (torch.arange(0, dim, 2, device=device).float() / dim), pairs)


class OwnWeights:
    """The weights of a model in a known layout by name, as torch's (out, in) linear weights (live
    parameters or views of them: differentiable, and updated in place by an optimizer), and its blocks."""
    def __init__(self, model):
        cfg = self.cfg = model.cfg
        self.w = model.state_dict(keep_vars=True)
        for name in [k for k in self.w if k.endswith(".weight")]:  # (in, out) storage: a transposed view
            if any(name.endswith(f"{m}.weight") for m in LAYOUTS[cfg.architecture].transposed):
                self.w[name] = self.w[name].t()
        self.act = ACTIVATIONS[cfg.act_fn]
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.block_norm, self.final_norm = _norm_kinds(cfg)
        self.scale = 1 / cfg.attn_scale if cfg.attn_scale > 0 else None  # None: 1 / sqrt(d_head)
        self.rotary = _rotary(model)
        self.gated, self.attn_only = cfg.gated_mlp, cfg.attn_only
        # an embedding's padding row gets no gradient (HuggingFace's ``padding_idx``): the same here
        self.padding_idx = next((m.padding_idx for m in model.modules() if isinstance(m, nn.Embedding)
                                 and m.weight is self.w["embed.weight"]), None)

    def norm(self, x: Tensor, name: str, kind: str | None) -> Tensor:
        weight, bias = self.w.get(f"{name}.weight"), self.w.get(f"{name}.bias")
        if kind in ("LN", "LNPre"):
            return F.layer_norm(x, x.shape[-1:], weight, bias, self.cfg.eps)
        if kind in ("RMS", "RMSPre"):
            return F.rms_norm(x, x.shape[-1:], weight, self.cfg.eps)
        return x

    def lin(self, x: Tensor, name: str) -> Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def embed(self, tokens: Int[Tensor, "batch pos"], start: int = 0) -> Float[Tensor, "batch pos d_model"]:
        x = F.embedding(tokens, self.w["embed.weight"], self.padding_idx)
        if "pos_embed.weight" in self.w:
            x = x + self.w["pos_embed.weight"][start : start + tokens.shape[1]]
        return x

    def unembed(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        return self.lin(self.norm(x, "ln_final", self.final_norm), "unembed")

    def qkv(self, h: Tensor, layer: int, start: int = 0) -> list[Tensor]:
        """Queries ``[batch, head, pos, d_head]``, keys and values ``[batch, kv_head, pos, d_head]``,
        queries and keys rotated to positions ``start ..`` where the model uses rotary positions."""
        n, t, _ = h.shape
        q, k, v = [self.lin(h, f"blocks.{layer}.attn.{m}").view(n, t, -1, self.d_head).transpose(1, 2)
                   for m in "qkv"]
        if self.rotary is not None:
            q, k = self.rotary(q, start), self.rotary(k, start)
        return [q, k, v]

    def add_lin(self, x: Float[Tensor, "batch pos d_model"], h: Tensor, name: str) -> Tensor:
        """``x + lin(h)`` as one fused multiply-add."""
        bias = self.w.get(f"{name}.bias")
        out = torch.addmm((x if bias is None else x + bias).reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.w[f"{name}.weight"].t())
        return out.view(x.shape)

    def mlp_hidden(self, h: Tensor, prefix: str) -> Tensor:
        if self.gated:
            return self.act(self.lin(h, f"{prefix}.mlp.gate")) * self.lin(h, f"{prefix}.mlp.in")
        return self.act(self.lin(h, f"{prefix}.mlp.in"))

    def block(self, x: Float[Tensor, "batch new d_model"], layer: int, kv=None, z_patch=None, start: int = 0
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One block on ``new`` positions starting at position ``start``. ``kv(k, v) -> (keys, vals)``
        supplies the keys and values of every position up to these (a cache with these written in;
        default: these alone, causal). ``z_patch`` may edit the heads' outputs
        ``z [batch, head, new, d_head]``. Returns ``(x, k, v, z)``."""
        n, new, _ = x.shape
        p = f"blocks.{layer}"
        q, k, v = self.qkv(self.norm(x, f"{p}.ln1", self.block_norm), layer, start)
        keys, vals = (k, v) if kv is None else kv(k, v)
        end = keys.shape[2]
        attend = dict(scale=self.scale, enable_gqa=self.n_kv != self.n_heads)
        if end == new or new == 1:
            z = F.scaled_dot_product_attention(q, keys, vals, is_causal=1 < new == end, **attend)
        else:  # new positions after a cached prefix: position i sees keys 0 .. end - new + i
            mask = torch.ones(new, end, dtype=torch.bool, device=x.device).tril(end - new)
            z = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask, **attend)
        if z_patch is not None:
            z = z_patch(z)
        x = self.add_lin(x, z.transpose(1, 2).reshape(n, new, -1), f"{p}.attn.o")
        if not self.attn_only:
            x = self.add_lin(x, self.mlp_hidden(self.norm(x, f"{p}.ln2", self.block_norm), p), f"{p}.mlp.out")
        return x, k, v, z

    def logits(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        x = self.embed(tokens)
        for layer in range(self.cfg.n_layers):
            x = self.block(x, layer)[0]
        return self.unembed(x)


class OwnForward(nn.Module):
    """``model``'s logits from its own weights, as a module (so ``DistributedDataParallel`` can wrap
    it); gradients reach ``model``'s parameters."""
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.own = OwnWeights(model)  # the live parameters: optimizer steps update them in place

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos vocab"]:
        if hooks_attached(self.model):  # hooks added since: honour them
            return self.model(tokens)
        return self.own.logits(tokens)


def fast_forward(model, what: str = "forward"):
    """A callable ``tokens -> logits``: :class:`OwnForward` when the model allows it, else the model."""
    return OwnForward(model) if use_own_weights(model, what) else model


class KVCache:
    """Decodes with the model's own weights and a key/value cache: one position per step."""
    def __init__(self, model, batch: int, max_len: int):
        self.own = OwnWeights(model)
        cfg = model.cfg
        dev = self.own.w["embed.weight"].device
        shape = (batch, self.own.n_kv, max_len, cfg.d_head)
        self.k = [torch.empty(shape, device=dev) for _ in range(cfg.n_layers)]
        self.v = [torch.empty(shape, device=dev) for _ in range(cfg.n_layers)]
        self.len = 0

    def _forward(self, tokens: Int[Tensor, "batch new"]) -> Float[Tensor, "batch vocab"]:
        n, new = tokens.shape
        start, end = self.len, self.len + new
        x = self.own.embed(tokens, start)
        for layer in range(len(self.k)):
            def write(k, v, layer=layer):
                self.k[layer][:n, :, start:end] = k
                self.v[layer][:n, :, start:end] = v
                return self.k[layer][:n, :, :end], self.v[layer][:n, :, :end]
            x = self.own.block(x, layer, write, start=start)[0]
        self.len = end
        return self.own.unembed(x[:, -1])

    def prefill(self, prompt: Int[Tensor, "batch p"]) -> Float[Tensor, "batch vocab"]:
        return self._forward(prompt)

    def step(self, token: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        return self._forward(token[:, None])

    def keep(self, rows) -> None:
        n = rows.shape[0]
        for cache in (self.k, self.v):
            for layer in range(len(cache)):
                kept = cache[layer][:n][rows]
                cache[layer][: kept.shape[0]] = kept
