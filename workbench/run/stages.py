"""The stages of the long jobs, in plain words: the one list every front end shows.

`term` names the glossary entry that explains a stage. Which stages a job goes through is the
job's business (workbench.run.pipeline, workbench.run.tune, exporters.bundle): a front end shows
the ones that start.
"""

from __future__ import annotations

from workbench.jobs import Stage
from workbench.quantization.methods import METHODS

# Making a run (quantize_run, and tune_run around each candidate).
MODEL = Stage("model", "Open the model")
EXPORT = Stage("export", "Export to ONNX", "ONNX")
CALIBRATION = Stage("calibration", "Prepare the example text", "calibration")
SENSITIVITY = Stage("sensitivity", "Find the layers that need 8 bits", "eight bit")
INT4 = Stage("int4", "Write the INT4 weights", "INT4")
FUSE = Stage("fuse", "Speed up attention", "fused attention")
MEASURE = Stage("measure", "Measure size and RAM", "RAM")
EVALUATE = Stage("evaluate", "Judge the quality on the text", "perplexity")

# Writing a bundle.
COPY = Stage("copy", "Copy the model")
CHECK = Stage("check", "Record the check answer")
CHECKSUMS = Stage("checksums", "Checksum every file")
ZIP = Stage("zip", "Zip the bundle")

# The methods' own stages (GPTQ, AWQ) come with their entries in workbench.quantization.methods.
METHOD_STAGES = tuple(m.stage for m in METHODS.values() if m.stage)
ALL = (MODEL, EXPORT, CALIBRATION, SENSITIVITY, *METHOD_STAGES, INT4, FUSE, MEASURE, EVALUATE, COPY, CHECK, CHECKSUMS,
       ZIP)


def candidate(number: int, of: int) -> Stage:
    """Auto-tune's stage for the `number`th setting tried."""
    return Stage(f"candidate {number}", f"Try setting {number} of {of} and judge it", "perplexity")
