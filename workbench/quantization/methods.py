"""The quantization methods, one entry each: what it needs, how it is named, and its function.

A new method is one entry here and its module. `function` ("module:function") is called on the
PyTorch model before the INT4 graph is written, as
`function(model, calibration, plan, settings, *, progress, cancelled) -> (precomputed, overrides)`:
the QuantizedWeight of each linear it rounded and the parameters it changed (None: none). Methods
without one round each weight while the graph is written (workbench.quantization.int4_graph). It
is named, not imported, so that this table stays as light as the settings that refer to it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from workbench.jobs import Cancelled, Progress, Stage


@dataclass(frozen=True)
class Method:
    name: str  # as QuantSettings.method and run.json name it
    title: str  # in a few plain words, for choosing
    term: str  # the glossary entry that explains it
    calibrated: bool = False  # reads calibration samples
    float_zero_points: bool = False  # fitted zero points, stored as floats
    act_order: bool = False  # honours QuantSettings.act_order
    stage: Stage | None = None  # its stage on the PyTorch model, and the stage's weight in a run
    weight: float = 0.0
    function: str | None = None

    def run(self, model, calibration, plan: dict[str, int], settings, *, progress: Progress,
            cancelled: Cancelled) -> tuple[dict, dict | None]:
        module, _, name = self.function.partition(":")
        quantize = getattr(importlib.import_module(module), name)
        return quantize(model, calibration, plan, settings, progress=progress, cancelled=cancelled)


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("rtn", "RTN: plain rounding (fastest)", "RTN"),
        Method("hqq", "HQQ: fitted rounding, no example text", "HQQ", float_zero_points=True),
        Method(
            "gptq", "GPTQ: learns from example text (slower, best quality)", "GPTQ", calibrated=True, act_order=True,
            stage=Stage("gptq", "Round the weights carefully (GPTQ)", "GPTQ"), weight=8,
            function="workbench.quantization.gptq:quantize_with_settings",
        ),
        Method(
            "awq", "AWQ: protects what example text needs most", "AWQ", calibrated=True,
            stage=Stage("awq", "Scale and round the weights (AWQ)", "AWQ"), weight=4,
            function="workbench.quantization.awq:quantize_with_settings",
        ),
    )
}
