"""The model's own weights, run directly: the one fast forward used by rollouts, patching and training.

A hooked forward pays for its hook points; running the same weights with plain tensor operations
(fused ``scaled_dot_product_attention``, fused multiply-add residuals, a key/value cache for
decoding) is several times faster. It is used only where it computes exactly what the hooked model computes:

- every field of the model's config is either known not to change the computation or holds a
  value this module implements (an allow-list: an unknown field or value refuses);
- the architecture is one whose weight layout this module knows (``LAYOUTS``: a native
  ``TransformerBridge.boot_native`` model, or a GPT-2 model booted from HuggingFace, whose attention
  output and MLP weights the bridge keeps in GPT-2's transposed ``Conv1D`` layout) and the weights
  have exactly the names of that layout;
- no hook is attached to the model (a user's hook would be skipped).

:func:`refusal` says why a model is refused (``None``: accepted); every caller then falls back to
the hooked model and logs the choice on the ``tsds_interp`` logger at debug level.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

log = logging.getLogger("tsds_interp")

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}
# Config fields whose value this module implements: the values it accepts, or a test of the value.
ACCEPTED = {
    "attention_dir": ("causal",), "normalization_type": ("LN",), "positional_embedding_type": ("standard",),
    "use_attn_scale": (True,), "n_devices": (1,),
    "attn_scores_soft_cap": (None, -1, 0), "output_logits_soft_cap": (None, -1, 0), "scale_embedding": (None, False),
    **dict.fromkeys(("attn_only", "use_local_attn", "final_rms", "gated_mlp", "is_audio_model", "is_multimodal",
                     "is_stateful", "is_visual_model", "load_in_4bit", "parallel_attn_mlp", "post_embedding_ln",
                     "rmsnorm_uses_offset", "scale_attn_by_inverse_layer_idx", "use_normalization_before_and_after",
                     "use_NTK_by_parts_rope", "use_qk_norm", "uses_rms_norm", "layer_norm_folding"), (False,)),
    **dict.fromkeys(("attn_types", "window_size", "num_experts", "per_layer_head_dim",
                     "per_layer_num_key_value_heads", "rotary_dim", "experts_per_token"), (None,)),
}
# Weight layouts by architecture: the weights stored as (in, out) rather than torch's (out, in).
LAYOUTS = {"TransformerLensNative": (), "GPT2LMHeadModel": ("attn.o", "mlp.in", "mlp.out")}
TESTS = {
    "architecture": lambda v, c: v in LAYOUTS,
    "act_fn": lambda v, c: v in ACTIVATIONS,
    "attn_scale": lambda v, c: v == -1 or math.isclose(v, math.sqrt(c.d_head), rel_tol=1e-12),  # -1: sqrt(d_head)
    "d_vocab_out": lambda v, c: v in (-1, c.d_vocab),
    "dtype": lambda v, c: v == torch.float32,
    "n_key_value_heads": lambda v, c: v in (None, c.n_heads),
}
# Config fields that do not change what the forward computes (sizes are read from the weights;
# rotary, NTK, relative-attention, vision and expert settings act only through fields checked above).
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
    "bos_token_id", "eos_token_id", "pad_token_id",
}


def weight_names(n_layers: int) -> set[str]:
    """The state-dict names of a native model with ``n_layers`` blocks."""
    per_block = [f"{m}.{p}" for m in ("ln1", "ln2", "attn.q", "attn.k", "attn.v", "attn.o", "mlp.in", "mlp.out")
                 for p in ("weight", "bias")]
    return ({"embed.weight", "pos_embed.weight", "ln_final.weight", "ln_final.bias", "unembed.weight",
             "unembed.bias"} | {f"blocks.{i}.{n}" for i in range(n_layers) for n in per_block})


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
            return f"config field {name} is not known to this module"
        if not ok:
            return f"{name}={value!r}"
    for name in ("uses_rms_norm", "use_qk_norm"):
        if name not in fields and getattr(cfg, name, False):
            return f"{name}={getattr(cfg, name)!r}"
    if set(model.state_dict()) != weight_names(cfg.n_layers):
        return "the weights are not those of a native TransformerBridge model"
    if hooks_attached(model):
        return "hooks are attached to the model"
    return None


def use_own_weights(model, what: str) -> bool:
    """Whether ``what`` (e.g. "rollout") may run the own-weights forward; logs the choice."""
    reason = refusal(model)
    log.debug("%s: %s", what, "own-weights forward" if reason is None else f"hooked forward ({reason})")
    return reason is None


class OwnWeights:
    """The weights of a model in a known layout by name, as torch's (out, in) linear weights (live
    parameters or views of them: differentiable, and updated in place by an optimizer), and its blocks."""
    def __init__(self, model):
        self.cfg = model.cfg
        self.w = model.state_dict(keep_vars=True)
        for name in [k for k in self.w if k.endswith(".weight")]:  # (in, out) storage: a transposed view
            if any(name.endswith(f"{m}.weight") for m in LAYOUTS[self.cfg.architecture]):
                self.w[name] = self.w[name].t()
        self.act = ACTIVATIONS[self.cfg.act_fn]
        self.n_heads, self.d_head = self.cfg.n_heads, self.cfg.d_head

    def ln(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"], self.cfg.eps)

    def lin(self, x: Tensor, name: str) -> Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def embed(self, tokens: Int[Tensor, "batch pos"], start: int = 0) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.w["embed.weight"]) + self.w["pos_embed.weight"][start : start + tokens.shape[1]]

    def unembed(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
        return self.lin(self.ln(x, "ln_final"), "unembed")

    def qkv(self, h: Tensor, layer: int) -> list[Tensor]:
        """Queries, keys and values ``[batch, head, pos, d_head]``."""
        n, t, _ = h.shape
        return [self.lin(h, f"blocks.{layer}.attn.{m}").view(n, t, self.n_heads, self.d_head).transpose(1, 2)
                for m in "qkv"]

    def add_lin(self, x: Float[Tensor, "batch pos d_model"], h: Tensor, name: str) -> Tensor:
        """``x + lin(h)`` as one fused multiply-add."""
        out = torch.addmm((x + self.w[f"{name}.bias"]).reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1]),
                          self.w[f"{name}.weight"].t())
        return out.view(x.shape)

    def block(self, x: Float[Tensor, "batch new d_model"], layer: int, kv=None, z_patch=None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One block on ``new`` positions. ``kv(k, v) -> (keys, vals)`` supplies the keys and values of
        every position up to these (a cache with these written in; default: these alone, causal).
        ``z_patch`` may edit the heads' outputs ``z [batch, head, new, d_head]``. Returns ``(x, k, v, z)``."""
        n, new, _ = x.shape
        p = f"blocks.{layer}"
        q, k, v = self.qkv(self.ln(x, f"{p}.ln1"), layer)
        keys, vals = (k, v) if kv is None else kv(k, v)
        end = keys.shape[2]
        if end == new or new == 1:
            z = F.scaled_dot_product_attention(q, keys, vals, is_causal=1 < new == end)
        else:  # new positions after a cached prefix: position i sees keys 0 .. end - new + i
            mask = torch.ones(new, end, dtype=torch.bool, device=x.device).tril(end - new)
            z = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        if z_patch is not None:
            z = z_patch(z)
        x = self.add_lin(x, z.transpose(1, 2).reshape(n, new, -1), f"{p}.attn.o")
        x = self.add_lin(x, self.act(self.lin(self.ln(x, f"{p}.ln2"), f"{p}.mlp.in")), f"{p}.mlp.out")
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
        shape = (batch, cfg.n_heads, max_len, cfg.d_head)
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
            x = self.own.block(x, layer, write)[0]
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
