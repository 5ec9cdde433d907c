"""A streaming decoder-graph builder: fused ONNX decoders written tensor by tensor from safetensors or GGUF."""

from exporters.builder.decoder import SUPPORTED_MODEL_TYPES, build_decoder, supports

__all__ = ["SUPPORTED_MODEL_TYPES", "build_decoder", "supports"]
