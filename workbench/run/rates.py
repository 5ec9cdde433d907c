"""How long each stage of a quantization takes on this machine, learnt from the runs made here.

Every finished run leaves its stage timings, per billion parameters, in a small JSON file in the
user's cache folder (rates.json, one entry per machine); estimates before a run, the pipeline's
stage weights and the remaining time during a run all come from these rates. A stage never
measured here takes a default rate, measured once on a busy two-core machine, and the estimate
says so.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from workbench.jobs import Stage
from workbench.settings import QuantSettings
from workbench.sources import cache_dir

log = logging.getLogger(__name__)
RATES_FILE = "rates.json"
RATES_VERSION = 1
# Seconds per billion parameters, from the demo model (SmolLM2-135M) on a busy two-core machine.
DEFAULT_RATES = {
    "model": 80.0,
    "export": 600.0,
    "calibration:written": 6700.0,  # the model writes its own example text
    "calibration:file": 40.0,
    "sensitivity": 1500.0,
    "gptq": 2500.0,
    "awq": 1500.0,
    "int4": 50.0,
    "fuse": 55.0,
    "measure": 60.0,
}
# A new measurement counts this much against what was remembered: recent runs speak for the machine now.
NEW_WEIGHT = 0.5


def rate_key(stage: str, settings: QuantSettings, calibration: Path | None) -> str:
    """The rate a stage is timed by: data-free calibration is a different job from reading a file."""
    if stage == "calibration":
        return "calibration:file" if calibration is not None else "calibration:written"
    return stage


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
    """This machine's rates: {key: {"seconds_per_billion": x, "runs": n}}."""
    return _read().get("machines", {}).get(machine_id(), {})


def remember(timings_s: dict[str, float], parameters: int, settings: QuantSettings, calibration: Path | None) -> None:
    """Fold a finished run's stage timings into this machine's rates (a write failure is only logged)."""
    data = _read() or {"version": RATES_VERSION, "machines": {}}
    rates = data["machines"].setdefault(machine_id(), {})
    billions = parameters / 1e9
    for stage, seconds in timings_s.items():
        if billions <= 0 or stage not in {k.partition(":")[0] for k in DEFAULT_RATES}:
            continue
        key = rate_key(stage, settings, calibration)
        rate = seconds / billions
        known = rates.get(key)
        if known:
            rate = (1 - NEW_WEIGHT) * known["seconds_per_billion"] + NEW_WEIGHT * rate
        rates[key] = {"seconds_per_billion": round(rate, 3), "runs": (known or {}).get("runs", 0) + 1}
    path = rates_path()
    temporary = path.with_suffix(".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        log.warning("cannot remember the stage timings in %s: %s", path, error)


@dataclass(frozen=True)
class Estimate:
    """Seconds per stage before a run, and whether each comes from this machine's own runs."""

    stages: dict[str, float]
    measured: frozenset[str] = field(default_factory=frozenset)  # the stages timed here before

    @property
    def seconds(self) -> float:
        return sum(self.stages.values())

    @property
    def basis(self) -> str:
        """Where the figure comes from, in words (it is always an estimate)."""
        if self.measured and self.measured >= set(self.stages):
            return "an estimate from the runs made on this machine"
        if self.measured:
            return "an estimate: partly from the runs made on this machine, partly from typical rates"
        return "a rough estimate from typical rates: no run was timed on this machine yet"

    def stage_fraction(self, stage: str, overall: float) -> float:
        """The share of `stage` done when the whole job (weighted by these seconds) is at `overall`."""
        total = self.seconds or 1.0
        start = 0.0
        for name, seconds in self.stages.items():
            if name == stage:
                return min(max((overall * total - start) / seconds, 0.0), 1.0) if seconds else 1.0
            start += seconds
        return 0.0

    def remaining(self, done: Iterable[str], current: str | None, fraction: float, elapsed: float) -> float:
        """Seconds left: the current stage's rest (from its own pace once a tenth is done, else its
        estimate) plus every stage not started yet."""
        done = set(done)
        left = 0.0
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


def timed_weights(
    weights: Sequence[tuple[Stage, float]], settings: QuantSettings, calibration: Path | None
) -> list[tuple[Stage, float]]:
    """A job's stage weights as the seconds per billion parameters each takes here (0 stays 0: not run).

    Every stage's time grows with the model's size alike, so these weights hold for any model."""
    rates = measured_rates()
    return [(stage, _rate(rates, rate_key(stage.name, settings, calibration)) if weight else 0.0)
            for stage, weight in weights]


def _rate(rates: dict, key: str) -> float:
    known = rates.get(key)
    return known["seconds_per_billion"] if known else DEFAULT_RATES.get(key, 0.0)


def estimate(parameters: int, settings: QuantSettings, calibration: Path | None, stages: Sequence[str]) -> Estimate:
    """How long each of `stages` should take for a model of `parameters` with these settings."""
    rates = measured_rates()
    keys = {stage: rate_key(stage, settings, calibration) for stage in stages}
    return Estimate(
        {stage: _rate(rates, key) * parameters / 1e9 for stage, key in keys.items()},
        frozenset(stage for stage, key in keys.items() if key in rates),
    )
