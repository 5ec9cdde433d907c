"""What the wizard has chosen so far, shared by all pages; pages react to its signals."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from workbench.run.record import RunRecord
from workbench.settings import DEFAULT_PRESET, QuantSettings, preset_settings
from workbench.sources import ResolvedModel


@dataclass(frozen=True)
class ModelFacts:
    """The core's size and RAM figures for a model, computed once when it is opened."""

    original_bytes: int  # fp32 ONNX weights, as `original_sizes` counts them
    preset_bytes: dict[str, int]  # INT4 size per preset
    ram: dict[str, int]  # `ram_estimates` of the default preset; the Model step reads the machine and GPU from it


@dataclass(frozen=True)
class TuneChoice:
    """Auto-tune instead of one setting: the perplexity rise allowed on the user's own text."""

    max_quality_loss_pct: float
    text: Path | None  # None until the user chooses one


class Session(QObject):
    model_changed = Signal()
    settings_changed = Signal()
    calibration_changed = Signal()
    runs_dir_changed = Signal()
    run_changed = Signal()

    def __init__(self, runs_dir: Path):
        super().__init__()
        self.runs_dir = Path(runs_dir)
        self.model: ResolvedModel | None = None
        self.facts: ModelFacts | None = None
        self.trust_remote_code = False  # as the model was opened; the export needs the same answer
        self.preset: str = DEFAULT_PRESET
        self.settings: QuantSettings = preset_settings(DEFAULT_PRESET)
        self.tune: TuneChoice | None = None  # set: quantizing tries several settings and keeps one
        self.calibration: Path | None = None  # None: the model writes its own (data-free)
        self.calibration_problem: str | None = None  # a chosen file that cannot be used, and why
        self.run_dir: Path | None = None
        self.record: RunRecord | None = None

    def set_model(self, model: ResolvedModel, facts: ModelFacts, trust_remote_code: bool = False) -> None:
        self.model, self.facts, self.trust_remote_code = model, facts, trust_remote_code
        self.model_changed.emit()

    def set_settings(self, preset: str, settings: QuantSettings) -> None:
        self.preset, self.settings = preset, settings
        self.settings_changed.emit()

    def set_tune(self, tune: TuneChoice | None) -> None:
        self.tune = tune
        self.settings_changed.emit()

    def set_calibration(self, path: Path | None, problem: str | None = None) -> None:
        self.calibration, self.calibration_problem = path, problem
        self.calibration_changed.emit()

    def set_runs_dir(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir_changed.emit()

    def set_run(self, run_dir: Path, record: RunRecord) -> None:
        self.run_dir, self.record = Path(run_dir), record
        self.run_changed.emit()
