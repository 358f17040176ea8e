"""HuggingFace architectures without a network: small GPT-2-, Llama-, Qwen2- and Mistral-style models
with random weights and a word-level tokenizer, written with ``save_pretrained`` and booted with
``TransformerBridge.boot_transformers(folder)``.

With downloaded weights the calls are the same: ``boot(folder)`` on the folder that holds the
model's ``config.json``, weights and tokenizer files (e.g. a ``huggingface-cli download`` target).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tsds_interp import checks

ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral")
SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def word_tokenizer(words: list[str]):
    """A ``PreTrainedTokenizerFast`` splitting on whitespace, with ids: the special tokens
    ``<pad> <bos> <eos> <unk>`` (0-3), then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *[w for w in words if w not in SPECIAL]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_random(architecture: str, folder: str | os.PathLike, words: list[str], d_model: int = 32,
                n_layers: int = 2, n_heads: int = 4, d_mlp: int = 64, n_ctx: int = 64, seed: int = 0) -> Path:
    """Write a randomly initialised ``architecture`` model and its tokenizer to ``folder``. The Llama,
    Qwen2 and Mistral models use grouped-query attention (two query heads per key/value head), rotary
    positions, RMSNorm and a gated SiLU MLP; Qwen2 adds biases to the query, key and value maps."""
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    checks.out_dir(folder, "folder")  # never over a project checkpoint, stage or the shipped package
    tokenizer = word_tokenizer(words)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    if architecture == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp, n_positions=n_ctx, **ids))
    else:
        name = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[architecture]
        config = getattr(transformers, f"{name}Config")(
            hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=max(1, n_heads // 2), intermediate_size=d_mlp, max_position_embeddings=n_ctx, **ids)
        model = getattr(transformers, f"{name}ForCausalLM")(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def boot(folder: str | os.PathLike, device: str = "cpu"):
    """A ``TransformerBridge`` of the HuggingFace model in ``folder``, without touching the network."""
    from transformer_lens.model_bridge import TransformerBridge

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; write a model there with save_pretrained")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"{folder} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                         f"there with tokenizer.save_pretrained")
    device = checks.device(str(device))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = TransformerBridge.boot_transformers(str(folder), device=device)
    model.eval()
    return model
