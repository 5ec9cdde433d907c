"""The quantize command's options become the settings they name, on top of the preset."""

from __future__ import annotations

from workbench.cli import PROGRESS_WIDTH, _settings_from, build_parser, shorten
from workbench.settings import PRESETS


def settings_for(*options: str):
    return _settings_from(build_parser().parse_args(["quantize", "demo", "-o", "out", *options]))


def test_no_options_give_the_preset():
    assert settings_for() == PRESETS["balanced"].settings
    assert settings_for("--preset", "quality") == PRESETS["quality"].settings


def test_options_override_the_preset():
    settings = settings_for("--no-act-order", "--sensitive-8bit", "5", "--method", "awq", "--block-size", "64",
                            "--symmetric", "--eight-bit", "lm_head")
    assert not settings.act_order and settings.sensitive_8bit_pct == 5.0
    assert (settings.method, settings.block_size, settings.symmetric) == ("awq", 64, True)
    assert settings.eight_bit == ("lm_head",)
    assert settings_for("--preset", "smallest", "--act-order").act_order


def test_a_small_model_writing_its_own_text_writes_more_samples():
    balanced = PRESETS["balanced"].settings
    sizes = (135_000_000, 360_000_000, 1_240_000_000, 8_000_000_000)
    assert [balanced.for_model(size, reads_file=False).calibration_samples for size in sizes] == [128, 64, 32, 32]
    assert balanced.for_model(sizes[0], reads_file=True).calibration_samples == 32  # a file's text is as long as it is
    rtn = settings_for("--method", "rtn")  # reads no file, given or not
    assert rtn.for_model(sizes[0], reads_file=True) == rtn.for_model(sizes[0], reads_file=False)
    asked = settings_for("--calibration-samples", "16")
    assert asked.calibration_samples == 16 and asked.for_model(sizes[0], reads_file=False).calibration_samples == 16


def test_a_long_progress_message_keeps_its_stage_and_its_count():
    message = "calibration: 8-bit copy: the model writes its example text: token 147 of 256"
    line = shorten(message)
    assert len(line) == PROGRESS_WIDTH and line.startswith("calibration") and line.endswith("token 147 of 256")
    assert shorten("gptq: layer 3 of 30") == "gptq: layer 3 of 30"
