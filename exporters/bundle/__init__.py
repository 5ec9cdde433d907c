"""Deployable bundles of a run's INT4 model, and their verification.

A bundle holds what another machine needs and nothing of the workbench: the INT4 graph (and its
external weights), the tokenizer and configs, runner.json (the chat template rendered into fixed
text, end-of-sequence ids, context length) and manifest.json (every file's size and SHA-256, the
figures measured on the run, and a short greedy answer to a fixed prompt). The `runner` target adds
run.py, engine.py (workbench/generation/engine.py, byte for byte: one decode loop everywhere),
chat_format.py, requirements.txt and, for graphs it was checked with, genai_config.json; the
`triton` target lays the same model out as a Triton Inference Server model repository.

`verify_bundle` reads a bundle folder or zip, checks every file against the manifest, regenerates
the fixed prompt's answer and compares it with the recorded one.

One module per job: layout (file names, where a target puts the model), write (the folder or zip),
check (the fixed prompt's answer), chat_template (a Jinja template as fixed text), genai
(onnxruntime-genai's config), card (README.md), files (streamed copies and checksums), verify.
"""


from exporters.bundle.layout import (
    CHECK_PROMPT,
    ENGINE_FILE,
    GENAI_FILE,
    MANIFEST_FILE,
    RUNNER_DIR,
    RUNNER_FILES,
    TARGETS,
    Layout,
)
from exporters.bundle.verify import VerifyResult, verify_bundle
from exporters.bundle.write import BundleResult, build_bundle

__all__ = [
    "CHECK_PROMPT",
    "ENGINE_FILE",
    "GENAI_FILE",
    "MANIFEST_FILE",
    "RUNNER_DIR",
    "RUNNER_FILES",
    "TARGETS",
    "BundleResult",
    "Layout",
    "VerifyResult",
    "build_bundle",
    "verify_bundle",
]
