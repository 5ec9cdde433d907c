"""ONNX Runtime sessions for exported causal LMs: provider choice and a forward pass with KV cache."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.onnx_export import MODEL_FILE
from workbench.errors import WorkbenchError

log = logging.getLogger(__name__)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class ProviderChoice:
    name: str  # cpu | cuda
    providers: list[str]
    reason: str  # why this provider, in words


def choose_provider(requested: str = "auto") -> ProviderChoice:
    """`auto` takes CUDA when ONNX Runtime offers it; asking for CUDA without it is an error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested not in ("auto", *PROVIDERS):
        raise WorkbenchError(f"Unknown provider {requested!r}; choose auto, cpu or cuda.")
    has_cuda = PROVIDERS["cuda"] in available
    if requested == "cuda" and not has_cuda:
        raise WorkbenchError(
            "CUDA was asked for, but this ONNX Runtime has no CUDA provider (no NVIDIA GPU, driver "
            "or CUDA libraries found). Choose the CPU provider, or install onnxruntime-gpu with a "
            "working CUDA setup."
        )
    if requested == "cuda" or (requested == "auto" and has_cuda):
        return ProviderChoice("cuda", [PROVIDERS["cuda"], PROVIDERS["cpu"]], "CUDA is available")
    reason = "asked for" if requested == "cpu" else "no CUDA provider in this ONNX Runtime"
    return ProviderChoice("cpu", [PROVIDERS["cpu"]], reason)


class OnnxCausalLM:
    """One exported model (optimum's text-generation-with-past graph) in an ORT session."""

    def __init__(self, model_dir: Path, provider: str = "cpu", threads: int | None = None):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        self.provider = choose_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        path = self.model_dir / MODEL_FILE
        if not path.is_file():
            raise WorkbenchError(f"{path} is missing; the run folder is incomplete. Quantize the model again.")
        self.session = ort.InferenceSession(str(path), options, providers=self.provider.providers)
        if self.provider.name == "cuda" and PROVIDERS["cuda"] not in self.session.get_providers():
            raise WorkbenchError("The CUDA provider failed to start for this model; choose the CPU provider.")
        self.input_names = {i.name for i in self.session.get_inputs()}
        past = [(i, PAST_INPUT.match(i.name)) for i in self.session.get_inputs()]
        self.past_inputs = [i for i, match in past if match]
        self.layers = len(self.past_inputs) // 2
        first = self.past_inputs[0] if self.past_inputs else None
        self.kv_heads = first.shape[1] if first is not None else 0
        self.head_dim = first.shape[3] if first is not None else 0

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {i.name: np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32) for i in self.past_inputs}

    def forward(
        self,
        input_ids: np.ndarray,
        past: dict[str, np.ndarray] | None = None,
        attention_mask: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits for `input_ids` (batch, seq) after `past`; returns logits and the new past."""
        batch, length = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_length = next(iter(past.values())).shape[2] if past else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_length + length), np.int64)
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask, **past}
        if "position_ids" in self.input_names:
            positions = np.cumsum(attention_mask, axis=1)[:, -length:] - 1
            feeds["position_ids"] = np.maximum(positions, 0).astype(np.int64)
        outputs = self.session.run(None, feeds)
        names = [o.name for o in self.session.get_outputs()]
        present = {
            name.replace("present", "past_key_values"): value
            for name, value in zip(names, outputs)
            if name.startswith("present")
        }
        return outputs[names.index("logits")], present
