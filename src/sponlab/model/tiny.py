"""Tiny random-init models of every supported architecture, for tests and pipeline smoke runs.

They are built from configs (no download) and can be saved with ``save_pretrained`` together with a
small word-level tokenizer, so a tiny end-to-end ``dvc repro`` exercises the real loading code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny_config(arch: str = "llama", layers: int = 4, hidden: int = 64, vocab: int = 512):
    """A small config with GQA (4 query heads, 2 KV heads) for ``arch``."""
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // 4)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=hidden // 4, sliding_window=64)
    raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs) -> PreTrainedModel:
    """A random-init causal LM in eval mode, deterministic for ``seed``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs))
    return model.eval()


def tiny_tokenizer(vocab: int = 512) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``vocab`` ids (unknown words map to <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(vocab - 4)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def save_tiny(out_dir: Path, arch: str = "llama", seed: int = 0, **kwargs) -> Path:
    """Write a tiny model and its tokenizer as a ``save_pretrained`` directory."""
    model = tiny_model(arch, seed=seed, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(out_dir)
    return out_dir
