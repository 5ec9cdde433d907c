"""Tiny real models for tests, built from a config with random weights (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SmolLM3Config,
)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still write text.
Quantization stores weights with fewer bits, so the model takes less memory and runs faster.
Every block of weights has its own scale; smaller blocks follow the weights more closely.
The workbench compares the original model with its four-bit copy on the user's own prompts.
{"name": "Ada", "age": 36, "tags": ["math", "engines"], "ok": true, "score": -1.5e3}
0123456789 , . ; : ! ? ( ) [ ] { } " ' - + * / = < > _ @ # $ % & | \\ ~ ^
"""

LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}


def build_tokenizer(path: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a few sentences: every string can be encoded."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path: Path, architecture: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random causal LM with its tokenizer to `path` (an HF folder)."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if architecture == "llama":
        config = LlamaConfig(tie_word_embeddings=True, **common)
    elif architecture == "llama3":  # Llama 3.2's rotary: heads of 64, theta 500000, scaled by 32
        config = LlamaConfig(tie_word_embeddings=True, **common | {"hidden_size": 128, "num_attention_heads": 2,
                                                                   "num_key_value_heads": 1},
                             rope_theta=500000.0, rope_scaling=LLAMA3_ROPE_SCALING)
    elif architecture == "qwen2":
        config = Qwen2Config(tie_word_embeddings=False, **common)
    elif architecture == "granite":  # multipliers far from 1, so each shows in the logits
        config = GraniteConfig(tie_word_embeddings=False, embedding_multiplier=4.0, residual_multiplier=0.5,
                               attention_multiplier=0.1, logits_scaling=2.0, **common)
    elif architecture == "smollm3":  # SmolLM3's layers without rotary, every fourth: four layers for one of them
        config = SmolLM3Config(tie_word_embeddings=True, **common | {"num_hidden_layers": 4})
    else:
        raise ValueError(architecture)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; larger weights give the tiny model real preferences.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_extra_model(path: Path, config_class, **extra) -> Path:
    """A tiny random model of an architecture `build_model` does not build: `config_class` with `extra`."""
    path.mkdir(parents=True)
    tokenizer = build_tokenizer(path)
    config = config_class(**{
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, **extra,
    })
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.15) if parameter.dim() == 2 else parameter.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True)
    return path
