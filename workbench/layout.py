"""What lies where in a model folder and a run folder: the one place both the core and the exporters read it from.

A model folder holds model.onnx with its weights in model.onnx.data, plus the tokenizer and configs
(SIDE_FILES). A run folder holds run.json, the fp32 model in ORIGINAL/ and the INT4 model in INT4/.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"
# Files a runner needs next to the graph; optimum copies most, these make sure of the rest.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# The operator set of MatMulNBits, GatherBlockQuantized and GroupQueryAttention in our graphs.
MS_DOMAIN = "com.microsoft"
RUN_FILE = "run.json"
REPORT_FILE = "report.md"
CHART_FILE = "memory.png"
TUNE_CHART_FILE = "tune.png"
ORIGINAL = "original"
INT4 = "int4"


def save_model(model: onnx.ModelProto, dest_dir: Path) -> None:
    """Write model.onnx with its weights in model.onnx.data, replacing the data file of an earlier save.

    ONNX Runtime maps an external data file instead of copying the weights out of the parsed
    graph: measured on the demo model, a session's peak RAM fell from 808 to 679 MiB (fp32) and
    from 280 to 214 MiB (INT4). `model` must hold its weights in memory (onnx.load does).
    """
    import onnx

    dest_dir.mkdir(parents=True, exist_ok=True)
    for stale in dest_dir.glob(f"{MODEL_FILE}?data"):  # ours, or optimum's model.onnx_data; onnx would append
        stale.unlink()
    onnx.save_model(
        model,
        str(dest_dir / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{MODEL_FILE}.data",
        size_threshold=1024,
    )


def use_ms_domain(model: onnx.ModelProto) -> None:
    """Declare the com.microsoft operator set in `model`, once."""
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`; files that vanish meanwhile (a folder being removed) count as none."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def folder_model_bytes(folder: Path) -> int:
    """The model's own bytes (graph and weights), without tokenizer and configs."""
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))
