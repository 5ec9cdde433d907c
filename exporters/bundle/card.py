"""README.md of a bundle: front matter for model hubs, then the run in words (workbench.run.wording)."""

from __future__ import annotations

from exporters import serving
from exporters.bundle.layout import CHECK_PROMPT, Layout
from workbench import __version__
from workbench.run.record import RunRecord
from workbench.run.wording import card_lost_lines, card_saved_lines, verdict

# The demo model's upstream facts, for the model card (sources.py knows it only as a GGUF package).
DEMO_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_LICENSE = "apache-2.0"


def base_model(record: RunRecord) -> str | None:
    source = record.source
    if source.kind == "demo":
        return DEMO_BASE_MODEL
    return source.spec if source.kind == "hub" else None


def model_card(record: RunRecord, layout: Layout, genai: dict) -> str:
    """README.md: front matter for model hubs, then what was saved and lost in plain words."""
    source, settings = record.source, record.settings
    base = base_model(record)
    licence = DEMO_LICENSE if source.kind == "demo" else None
    front = ["---", *([f"base_model: {base}"] if base else []), f"license: {licence or 'other'}",
             "library_name: onnxruntime", "pipeline_tag: text-generation", "tags:", "- onnx", "- int4", "- matmulnbits",
             "---"]
    lines = [
        *front,
        "",
        f"# {source.name}, INT4 (ONNX Runtime MatMulNBits)",
        "",
        f"{source.name} with its weights stored in 4 bits ({settings.method.upper()}, blocks of "
        f"{settings.block_size}, {'symmetric' if settings.symmetric else 'asymmetric'}), made with INT4 Workbench "
        f"{__version__}.{'' if licence else ' The original licence was not recorded: check it before sharing this model.'}",
        "",
        verdict(record),
        "",
        "## What was saved",
        "",
        *card_saved_lines(record),
        "",
        "## What was lost",
        "",
        *card_lost_lines(record),
    ]
    lines += ["", "## Run it", ""]
    if layout.target != "triton":  # the runner, alone or with a Ray Serve config
        lines += [
            "```",
            "pip install -r requirements.txt",
            'python run.py --prompt "Hello!"     # one answer; without --prompt: a conversation',
            "```",
            "",
            "It needs Python 3.10 or newer, onnxruntime, tokenizers and numpy, nothing else. `--temperature 0.7 "
            "--seed 1` samples instead of always taking the likeliest word; `--provider cuda` runs on an NVIDIA GPU "
            "with onnxruntime-gpu installed in place of onnxruntime.",
            "",
            f"onnxruntime-genai: genai_config.json is {'included' if genai['written'] else 'not included'}: "
            f"{genai['reason']}",
        ]
    else:
        lines += [
            f"This folder is a Triton Inference Server model repository: `{layout.name}/config.pbtxt` and "
            f"`{layout.model()}` for the onnxruntime backend.",
            "",
            "```",
            "docker run --rm -p 8000:8000 -p 8001:8001 -v $PWD:/models nvcr.io/nvidia/tritonserver:<release>-py3 \\",
            "    tritonserver --model-repository=/models",
            "```",
            "",
            "The model is stateless: each request carries input_ids, attention_mask, position_ids and the key/value "
            "cache of the previous step (past_key_values.N.key/value, length 0 on the first step); the response's "
            "present.N.key/value are the next step's cache. Tokenize with tokenizer.json; runner.json holds the chat "
            "format and end-of-sequence ids. The ONNX Runtime inside Triton must know the com.microsoft operators "
            "MatMulNBits (and GroupQueryAttention when attention is fused).",
        ]
    lines += serving.card_section(layout.target)
    lines += [
        "",
        "## Check it",
        "",
        f"manifest.json lists every file with its size and SHA-256, the figures above and a short answer to "
        f"\"{CHECK_PROMPT}\" (the same answer as the quantized model gave in the workbench). `int4-workbench verify .` "
        "checks the files and that the model still gives that answer.",
        "",
    ]
    return "\n".join(lines)
