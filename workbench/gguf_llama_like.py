"""Config and tokenizer of the GGUF architectures that are llama's plus a few keys (granite, smollm3).

llama.cpp's converter writes them as Llama (convert_hf_to_gguf.py: GraniteModel and SmolLM3Model
subclass LlamaModel): llama's metadata under the architecture's own prefix, llama's tensors with the
q/k rows interleaved for its rotary kernel, llama's tokenizer keys. transformers' GGUF loader (4.57)
refuses both names, so this reads them as llama with its tables (the config keys, the tokenizer
converter, the tensor processor) and adds what each writes or fixes beyond llama:
- granite: its four multipliers, `granite.attention.scale`, `.embedding_scale`, `.residual_scale`,
  `.logit_scale`, each written only when set; llama.cpp multiplies by none that is missing, and an
  absent attention scale is 1/sqrt(head_dim) (src/models/granite.cpp, src/llama-graph.cpp).
- smollm3: no key; llama.cpp leaves the rotary out of every fourth layer (src/llama-model.cpp:
  `hparams.n_no_rope_layer_step = 4`, used where `(il + 1) % 4 == 0`), SmolLM3's default.
"""

from __future__ import annotations

import math
from pathlib import Path

READ_AS = "llama"  # the architecture whose tables of transformers' GGUF loader read these
NO_ROPE_LAYER_STEP = 4  # llama.cpp's fixed step for smollm3


def _granite(metadata: dict, config: dict) -> dict:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "attention_multiplier": metadata.get("granite.attention.scale", 1 / math.sqrt(head_dim)),
        "embedding_multiplier": metadata.get("granite.embedding_scale", 1.0),
        "residual_multiplier": metadata.get("granite.residual_scale", 1.0),
        "logits_scaling": metadata.get("granite.logit_scale", 1.0),
    }


def _smollm3(metadata: dict, config: dict) -> dict:
    return {"no_rope_layers": [int((layer + 1) % NO_ROPE_LAYER_STEP != 0)
                               for layer in range(config["num_hidden_layers"])]}


# GGUF architecture -> the config it has beyond llama's, from the metadata and llama's config.
LLAMA_LIKE = {"granite": _granite, "smollm3": _smollm3}


def read_llama_like(path: Path, architecture: str, tensors: dict):
    """The config and fast tokenizer of a GGUF of a LLAMA_LIKE architecture (tensors: its tensor table)."""
    import gguf
    from transformers import AutoConfig, LlamaTokenizerFast
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING, GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    metadata = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}

    def renamed(prefix: str, names: dict) -> dict:
        return {ours: metadata[f"{prefix}.{key}"] for key, ours in names.items() if f"{prefix}.{key}" in metadata}

    values = renamed(architecture, GGUF_CONFIG_MAPPING[READ_AS]) | renamed("tokenizer", GGUF_CONFIG_MAPPING["tokenizer"])
    tokenizer_values = renamed("tokenizer", GGUF_TOKENIZER_MAPPING["tokenizer"])
    values.setdefault("vocab_size", len(tokenizer_values["tokens"]))
    # As transformers' loader decides it for llama: a model without an output matrix ties it to the embeddings.
    values["tie_word_embeddings"] = "output.weight" not in tensors
    values |= LLAMA_LIKE[architecture](metadata, values)
    config = AutoConfig.for_model(architecture, **values)

    backend, extra = convert_gguf_tokenizer(READ_AS, tokenizer_values)
    # Its special tokens by the file's ids: transformers' llama converter (4.57) names BOS as the end token too.
    extra |= {f"{name}_token": tokenizer_values["tokens"][tokenizer_values[f"{name}_token_id"]]
              for name in ("bos", "eos", "unk", "pad") if f"{name}_token_id" in tokenizer_values}
    # Whether a text starts with BOS: as llama.cpp decides it, from the key its converter writes when the model's
    # tokenizer says, else none for a BPE vocabulary (both families'); transformers' llama reading always adds one.
    extra["add_bos_token"] = metadata.get(gguf.Keys.Tokenizer.ADD_BOS, False)
    tokenizer = LlamaTokenizerFast(tokenizer_object=backend,
                                   **renamed("tokenizer", GGUF_TOKENIZER_MAPPING["tokenizer_config"]), **extra)
    return config, tokenizer


def tensor_processor(architecture: str):
    """transformers' GGUF tensor processor class for a GGUF of `architecture`: llama's (q/k rows put back in
    Hugging Face's order) for the LLAMA_LIKE ones."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(READ_AS if architecture in LLAMA_LIKE else architecture, TensorProcessor)


def load_llama_like(path: Path, architecture: str, config):
    """The fp32 PyTorch model of a GGUF of a LLAMA_LIKE architecture whose config is `config`, converted as
    transformers' loader converts a llama GGUF: every tensor dequantized, processed and renamed."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = get_gguf_hf_weights_map(model, model_type=architecture)
    processor = tensor_processor(architecture)(config=config.to_dict())
    state = {}
    for tensor in gguf.GGUFReader(path).tensors:
        weights = processor.process(weights=gguf.dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                    tensor_key_mapping=names, parsed_parameters={}).weights
        if tensor.name in names:  # not llama.cpp's rope_freqs: the config has their rope scaling
            state[names[tensor.name]] = torch.from_numpy(np.copy(weights))
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    model.tie_weights()
    return model.eval()
