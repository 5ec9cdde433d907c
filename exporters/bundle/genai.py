"""genai_config.json: onnxruntime-genai's description of the graph, written only for graphs it was checked on."""

from __future__ import annotations

import json
from pathlib import Path

from exporters import triton
from workbench.layout import MODEL_FILE

# onnxruntime-genai 0.18.0 was run here on these architectures' INT4 graphs, attention fused into
# GroupQueryAttention and not, and gave the workbench's greedy tokens.
GENAI_MODEL_TYPES = ("llama", "qwen2")
GENAI_VERSION = "0.18.0"


def genai_unsupported(model_type: str, model_dir: Path) -> str | None:
    """Why onnxruntime-genai cannot be trusted to run this model; None when it was checked to."""
    if model_type not in GENAI_MODEL_TYPES:
        return (
            f"onnxruntime-genai {GENAI_VERSION} was checked here only on {', '.join(GENAI_MODEL_TYPES)} models; "
            f"this one is {model_type}."
        )
    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    decoder = (tokenizer.get("decoder") or {}).get("type")
    if decoder != "ByteLevel":
        # Seen on the demo model's GGUF-converted tokenizer (byte-level BPE with a SentencePiece-style
        # decoder sequence): genai's tokenizer took it for SentencePiece and wrote 'Ġ' for spaces.
        return (
            f"onnxruntime-genai's tokenizer was checked only on byte-level BPE tokenizers (decoder ByteLevel); "
            f"this tokenizer's decoder is {decoder}, and on such a tokenizer genai's text came out wrong. "
            "Use run.py, or genai with token ids from the `tokenizers` library."
        )
    return None


def genai_config(model_dir: Path, settings: dict) -> dict:
    """onnxruntime-genai's description of the graph: optimum's names, a cache that grows per step."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_path = model_dir / MODEL_FILE
    inputs = {spec.name for spec in triton.graph_interface(model_path)[0]}
    heads = config["num_attention_heads"]
    decoder_inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        decoder_inputs["position_ids"] = "position_ids"
    decoder_inputs.update({"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"})
    eos = settings["eos_token_ids"]
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id"),
            "context_length": settings["context_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": config.get("head_dim") or config["hidden_size"] // heads,
                "hidden_size": config["hidden_size"],
                "inputs": decoder_inputs,
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": heads,
                "num_hidden_layers": config["num_hidden_layers"],
                "num_key_value_heads": config.get("num_key_value_heads") or heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": config.get("pad_token_id") if config.get("pad_token_id") is not None else eos[0],
            "type": config["model_type"],
            "vocab_size": config["vocab_size"],
        },
        "search": {
            "do_sample": False, "max_length": settings["context_length"], "min_length": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
        },
    }
