"""How long each stage of a quantization takes on this machine, learnt from the runs made here.

Every finished run leaves its stage timings, per billion parameters, in a small JSON file in the
user's cache folder (rates.json, one entry per machine); estimates before a run, the pipeline's
stage weights and the remaining time during a run all come from these rates. A stage is timed
apart for each way it can run (the graph builder or the PyTorch export; calibration text written
by the model or read from a file, per calibration token), so a run of one kind does not teach
the estimate of another. A stage never timed here takes a default rate, measured on a two-core
machine, and the estimate says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from workbench.run import stages as stage_list
from workbench.settings import QuantSettings
from workbench.sources import cache_dir

log = logging.getLogger(__name__)
RATES_FILE = "rates.json"
RATES_VERSION = 2  # 1 had no separate keys for the graph builder's stages: its rates are not reused
# Seconds per billion parameters on a two-core machine (x86-64, 24 GiB): the graph builder's stages
# and "model", "calibration:written" and "measure" from the demo model (SmolLM2-135M), balanced
# preset, on a quiet machine (2026-12-02); the PyTorch path's stages as measured earlier on a busy
# one. The rates of TEXT_STAGES are for CALIBRATION_TOKENS tokens of calibration text.
DEFAULT_RATES = {
    "model": 29.4,
    "export": 600.0,  # the PyTorch (optimum) export
    "export:built": 6.8,  # the graph builder writes the fp32 original from the safetensors
    "calibration:written": 387.5,  # the model writes its own example text
    # ... a round-to-nearest copy on ONNX Runtime writes it (larger models): the Llama-3.2-1B shape's 8-bit copy,
    # 126 s for 1.24 B parameters (docs/scale.md, load 1.6-3.2)
    "calibration:copy": 102.0,
    "calibration:file": 40.0,
    "sensitivity": 1500.0,
    "gptq": 2500.0,  # on the whole PyTorch model
    "gptq:built": 319.6,  # one decoder layer at a time, for the graph builder
    "awq": 1500.0,
    "int4": 50.0,  # the INT4 pass over the exported graph
    "int4:built": 12.8,  # the graph builder writes the INT4 graph
    "fuse": 55.0,
    "measure": 37.8,  # both models: sizes, and RAM of a real session each
    "measure:int4": 5.7,  # the INT4 model alone (the original too large to write): an 8B shape, docs/scale.md
}
# A run's time outside its stages (the run folder, run.json, report.md and memory.png), in seconds
# whatever the model's size; for a command (`quantize`) also its own start (Python, the libraries).
# Defaults: the app's from a demo run on the busy machine, the command's from the quiet reference run.
DEFAULT_REST_S = {"rest": 1.0, "rest:command": 5.6}
BUILT_STAGES = ("export", "gptq", "int4")  # the stages the graph builder does its own way
# The rates of TEXT_STAGES are per this many tokens (32 samples of 256 tokens): their time grows with the
# calibration text's length.
CALIBRATION_TOKENS = 32 * 256
TEXT_STAGES = ("calibration", "gptq")
# A new timing within this factor of the remembered one is averaged with it (half each), so one
# noisy run moves the estimate only half-way; further off, the machine or the workbench changed
# (another load, a faster step in a new version) and the new timing replaces the old at once.
STEADY_FACTOR = 1.5
NEW_WEIGHT = 0.5
TITLES = {stage.name: stage.title for stage in stage_list.ALL}


@dataclass(frozen=True)
class RunShape:
    """What decides how long each stage of a run takes, besides the model's size."""

    settings: QuantSettings
    calibration: Path | None = None  # a calibration file read (None: the model writes its own, or none is used)
    built: bool = True  # the graph builder writes the graphs (workbench.run.streamed)
    original: bool = True  # the fp32 original is written and measured (skipped when too large to run here)
    opens_model: bool = False  # the run opens the model itself: a command, which also starts Python first

    @property
    def rest_key(self) -> str:
        """The rate of the time outside the stages."""
        return "rest:command" if self.opens_model else "rest"

    def key(self, stage: str) -> str | None:
        """The rate `stage` is timed by in a run of this shape; None when it does nothing worth timing
        (the builder's export when the original is not written)."""
        if stage == "export" and self.built and not self.original:
            return None
        if stage == "calibration":
            if self.calibration is not None:
                return "calibration:file"
            # The builder's path has a round-to-nearest copy on ONNX Runtime write the text (memory.calibration_writer).
            return "calibration:copy" if self.built else "calibration:written"
        if stage == "measure" and not self.original:
            return "measure:int4"
        return f"{stage}:built" if self.built and stage in BUILT_STAGES else stage

    def work(self, stage: str) -> float:
        """How much more work `stage` is than its rate stands for: writing or reading the calibration text, and
        GPTQ, which runs every layer over it, grow with its length (demo, 32 -> 128 samples: GPTQ 27.5 -> 108 s)."""
        return self.settings.calibration_token_count / CALIBRATION_TOKENS if stage in TEXT_STAGES else 1.0


def machine_id() -> str:
    """This machine as the rates file knows it: its processor and how many cores it has."""
    return f"{platform.machine()}-{platform.processor() or 'cpu'}-{psutil.cpu_count(logical=False) or 0}cores"


def rates_path() -> Path:
    return cache_dir() / RATES_FILE


def _read() -> dict:
    path = rates_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        log.warning("%s cannot be read (%s); using default rates", path, error)
        return {}
    return data if data.get("version") == RATES_VERSION else {}


def measured_rates() -> dict[str, dict]:
    """This machine's rates: {"KEY@SIZE": {"seconds_per_billion": x, "runs": n}, "rest": {"seconds": ...}}."""
    return _read().get("machines", {}).get(machine_id(), {})


def size_class(parameters: int) -> int:
    """Models within a factor of about two in size share their rates (the nearest power of two of the
    billions): a small model's rate per parameter carries its fixed costs, which a large one spreads."""
    return round(math.log2(max(parameters, 1) / 1e9))


def _nearest(rates: dict, key: str, parameters: int) -> tuple[dict, bool] | None:
    """The remembered rate of `key` from the runs on models nearest in size, and whether of this size."""
    here = size_class(parameters)
    sizes = [int(name.rpartition("@")[2]) for name in rates if name.rpartition("@")[0] == key]
    if not sizes:
        return None
    nearest = min(sizes, key=lambda size: (abs(size - here), -size))
    return rates[f"{key}@{nearest}"], nearest == here


def remember(timings_s: dict[str, float], parameters: int, shape: RunShape, rest_s: float | None = None) -> None:
    """Fold a finished run's stage timings, and the seconds it spent outside its stages (`rest_s`:
    the run folder, the report), into this machine's rates (a write failure is only logged).

    Leave out of `timings_s` a stage that did something no later run repeats (converting the demo
    or a GGUF file on first use)."""
    data = _read() or {"version": RATES_VERSION, "machines": {}}
    rates = data["machines"].setdefault(machine_id(), {})
    billions = parameters / 1e9
    for stage, seconds in timings_s.items():
        key = shape.key(stage)
        if billions > 0 and key in DEFAULT_RATES:
            name = f"{key}@{size_class(parameters)}"
            rates[name] = _folded(rates.get(name), "seconds_per_billion", seconds / billions / shape.work(stage))
    if rest_s is not None:
        rates[shape.rest_key] = _folded(rates.get(shape.rest_key), "seconds", rest_s)
    path = rates_path()
    temporary = path.with_suffix(".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot remember the stage timings in %s: %s", path, error)


def _folded(known: dict | None, unit: str, value: float) -> dict:
    """A remembered rate with a new measurement folded in (see STEADY_FACTOR)."""
    if known and 1 / STEADY_FACTOR <= value / max(known[unit], 1e-9) <= STEADY_FACTOR:
        value = (1 - NEW_WEIGHT) * known[unit] + NEW_WEIGHT * value
    return {unit: round(value, 3), "runs": (known or {}).get("runs", 0) + 1}


@dataclass(frozen=True)
class Estimate:
    """Seconds per stage before a run, and whether each comes from this machine's own runs."""

    stages: dict[str, float]
    measured: frozenset[str] = field(default_factory=frozenset)  # the stages timed here before
    runs: int = 0  # the most runs any of the measured rates comes from
    rest: float = 0.0  # seconds outside the stages (the report), after them
    other_size: bool = False  # some rates come from runs on models of quite another size

    @property
    def seconds(self) -> float:
        return sum(self.stages.values()) + self.rest

    @property
    def basis(self) -> str:
        """Where the figure comes from, in words (it is always an estimate)."""
        if self.measured and self.measured >= set(self.stages):
            return (f"an estimate from the runs made on this machine ({self.runs} so far), "
                    + ("scaled from models of another size" if self.other_size else "for a model of this size"))
        typical = ", ".join(TITLES.get(name, name) for name in self.stages if name not in self.measured)
        if self.measured:
            return ("an estimate partly from the runs made on this machine, partly from the rates of a typical "
                    f"two-core computer for: {typical}")
        return "a rough estimate from the rates of a typical two-core computer: no run was timed on this machine yet"

    @property
    def basis_sentence(self) -> str:
        """`basis` as a sentence of its own (the stage titles in it keep their capitals)."""
        return self.basis[:1].upper() + self.basis[1:] + "."

    def stage_fraction(self, stage: str, overall: float) -> float:
        """The share of `stage` done when the whole job (weighted by these seconds) is at `overall`."""
        total = sum(self.stages.values()) or 1.0
        start = 0.0
        for name, seconds in self.stages.items():
            if name == stage:
                return min(max((overall * total - start) / seconds, 0.0), 1.0) if seconds else 1.0
            start += seconds
        return 0.0

    def remaining(self, done: Iterable[str], current: str | None, fraction: float, elapsed: float) -> float:
        """Seconds left: the current stage's rest (from its own pace once a tenth is done, else its
        estimate) plus every stage not started yet, and the time after them."""
        done = set(done)
        left = self.rest
        for stage, seconds in self.stages.items():
            if stage in done:
                continue
            if stage == current:
                if fraction >= STAGE_PACE_FRACTION and elapsed > 0:
                    left += elapsed * (1 - fraction) / fraction
                else:
                    left += max(seconds - elapsed, 0.0)
            else:
                left += seconds
        return left


# Below this share of a stage, its own pace is too young to go by; the remembered rate is used.
STAGE_PACE_FRACTION = 0.1


def estimate(parameters: int, shape: RunShape, stages: Sequence[str]) -> Estimate:
    """How long each of `stages` should take for a model of `parameters` in a run of this shape."""
    rates = measured_rates()
    keys = {stage: shape.key(stage) for stage in stages if shape.key(stage)}
    known = {stage: _nearest(rates, key, parameters) for stage, key in keys.items()}
    return Estimate(
        {stage: (known[stage][0]["seconds_per_billion"] if known[stage] else DEFAULT_RATES[key])
         * shape.work(stage) * parameters / 1e9 for stage, key in keys.items()},
        frozenset(stage for stage, rate in known.items() if rate),
        max((rate[0]["runs"] for rate in known.values() if rate), default=0),
        rates[shape.rest_key]["seconds"] if shape.rest_key in rates else DEFAULT_REST_S[shape.rest_key],
        other_size=any(rate and not rate[1] for rate in known.values()),
    )
