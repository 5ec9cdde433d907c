"""Bad inputs and faults a new user meets (issue 11): each gets a plain message, a non-zero exit, and
leaves the disk as it was. Real files, real processes, a real file-size limit, a real read-only folder."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gguf_files import write_llama_gguf
from workbench.errors import WorkbenchError
from workbench.generation.compare import CompareOptions, compare
from workbench.generation.engine import GenerationConfig
from workbench.quality.evaluate import evaluate_run
from workbench.quantization.calibration import BYTES_PER_TOKEN, preview, read_texts
from workbench.run.pipeline import quantize_run
from workbench.settings import QuantSettings
from workbench.sources import inspect_folder, resolve

ROOT = Path(__file__).resolve().parents[1]
RTN = QuantSettings(method="rtn", block_size=16)
LONG_PROMPT = "word " * 400  # past the tiny models' context of 256 tokens
TEXT = "The quick brown fox jumps over the lazy dog, and the workbench measures what rounding cost. " * 40


def cli(*args: str, env: dict | None = None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=600, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **popen,
    )


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("faults-run") / "run"
    quantize_run(str(tiny_llama), run, RTN)
    return run


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def marker_code(marker: Path) -> str:
    """A line of Python that leaves `marker` behind if it ever runs."""
    return f"open({str(marker)!r}, 'w').write('this code ran')\n"


# 1 -- a huge calibration file is sampled across, never read whole -------------------------------------


def write_parts(path: Path, parts: int, part: str) -> None:
    """`parts` copies of `part`, each under a numbered heading, written without holding the file."""
    with path.open("w", encoding="utf-8") as handle:
        for number in range(parts):
            handle.write(part.format(number=number))


def test_a_large_text_file_is_sampled_across_in_bounded_memory(tmp_path):
    path = tmp_path / "big.txt"
    write_parts(path, 60000, "Paragraph {number}: " + TEXT[:200] + "\n\n")  # about 13 MB
    tokens = 8192
    tracemalloc.start()
    texts = read_texts(path, tokens=tokens)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * tokens * BYTES_PER_TOKEN < path.stat().st_size / 20  # never the whole file
    assert sum(len(t) for t in texts) <= tokens * BYTES_PER_TOKEN
    numbers = [int(t.split(":")[0].removeprefix("Paragraph ")) for t in texts]
    assert min(numbers) < 1000 and max(numbers) > 59000  # from the start to the end of the file, not its head


def test_the_preview_of_a_large_file_reads_pieces_and_says_so(tmp_path):
    path = tmp_path / "big.txt"
    write_parts(path, 200000, "Paragraph {number}: " + TEXT[:200] + "\n\n")  # about 44 MB
    tracemalloc.start()
    summary = preview(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert summary.sampled and 0 < summary.characters < path.stat().st_size / 2
    assert peak < path.stat().st_size / 2
    small = tmp_path / "small.txt"
    small.write_text(TEXT)
    assert not preview(small).sampled


def test_a_large_jsonl_file_is_sampled_in_whole_records(tmp_path):
    path = tmp_path / "big.jsonl"
    write_parts(path, 40000, '{{"text": "record {number}: ' + TEXT[:300] + '"}}\n')  # about 13 MB
    texts = read_texts(path, tokens=4096)
    numbers = [int(t.split(":")[0].removeprefix("record ")) for t in texts]
    assert all(t.endswith(TEXT[:300].strip()) for t in texts)  # no record cut at a piece's edges
    assert min(numbers) < 1000 and max(numbers) > 39000


def test_a_huge_json_file_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "huge.json"
    with path.open("w") as handle:  # sparse: 100 MB that cost no disk
        handle.truncate(100 * 2**20)
    with pytest.raises(WorkbenchError, match="Save the samples as .jsonl"):
        read_texts(path, tokens=8192)


# 2 -- SIGTERM, SIGKILL and partial folders: see test_signals.py


# 3 -- a custom architecture is refused before any of its code runs -----------------------------------


@pytest.mark.parametrize("trusted", [False, True])
def test_a_custom_architecture_is_refused_before_its_code_runs(tiny_llama, tmp_path, trusted):
    folder = copy_model(tiny_llama, tmp_path / "custom")
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_llm", architectures=["MyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_my.py").write_text(marker_code(marker) + (
        "from transformers import LlamaConfig\nclass MyConfig(LlamaConfig):\n    model_type = 'my_custom_llm'\n"))
    (folder / "modeling_my.py").write_text(marker_code(marker) + (
        "from transformers import LlamaForCausalLM\nclass MyForCausalLM(LlamaForCausalLM):\n    pass\n"))
    with pytest.raises(WorkbenchError, match="cannot quantize this model, with or without --trust-remote-code. "
                                             "None of the folder's code was run"):
        resolve(str(folder), trust_remote_code=trusted)
    assert not marker.exists()


# 4 -- pickle weights: tensors only ---------------------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_weights_load_as_tensors_and_the_user_is_told(tiny_llama, tmp_path, caplog):
    folder = copy_model(tiny_llama, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with caplog.at_level("WARNING", logger="workbench.sources"):
        info = inspect_folder(folder)
    assert info.parameters > 0
    assert "pickles (pytorch_model.bin)" in caplog.text and "save_pretrained" in caplog.text


def test_a_malicious_pickle_is_refused_and_never_runs(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "evil")
    marker = tmp_path / "payload-ran"
    torch.save({**load_file(folder / "model.safetensors"), "x": _Payload(marker)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    done = cli("info", str(folder), "-q")
    assert done.returncode == 2, done.stderr
    assert "pickle that needs more than tensors" in done.stderr and "system" in done.stderr
    assert "Traceback" not in done.stderr
    assert not marker.exists()


# 5 -- layer patterns that match nothing ----------------------------------------------------------------


@pytest.mark.parametrize("option", ["eight_bit", "exclude"])
def test_a_layer_pattern_matching_nothing_is_refused_with_the_names(tiny_llama, tmp_path, option):
    settings = RTN.replace(**{option: ("model.layers.0.*", "nomatch.*")})
    with pytest.raises(WorkbenchError, match=r"'nomatch\.\*' \(--.*\) matches no layer.*model\.layers\.0\.mlp\.down_proj"):
        quantize_run(str(tiny_llama), tmp_path / "run", settings)
    assert list(tmp_path.iterdir()) == []


# 6, 7, 17 -- prompts: too long, blank ------------------------------------------------------------------


def test_truncate_applies_to_everything_compare_does(tiny_run):
    options = CompareOptions(config=GenerationConfig(max_new_tokens=200), provider="cpu", truncate=True)
    result = compare(tiny_run, [LONG_PROMPT], options)  # memory measured on the truncated prompt, answer capped
    assert result.rows[0]["int4"]["tokens"] > 0 and result.rows[0]["int4"]["peak_rss_bytes"] > 0


def test_a_too_long_prompt_is_refused_in_compare_words(tiny_run):
    done = cli("compare", str(tiny_run), "--prompt", LONG_PROMPT, "--max-new-tokens", "4", "-q")
    assert done.returncode == 2
    assert "--truncate" in done.stderr and "measure with fewer" not in done.stderr


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_a_blank_prompt_is_refused(tiny_run, prompt):
    done = cli("compare", str(tiny_run), "--prompt", prompt, "-q")
    assert done.returncode == 2 and "The prompt is empty" in done.stderr


# 8 -- two first uses of a converted model at once -------------------------------------------------------


def test_two_processes_converting_the_same_model_at_once_both_succeed(tiny_llama, tmp_path):
    gguf = write_llama_gguf(tiny_llama, tmp_path / "tiny.gguf")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "INT4_WORKBENCH_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "workbench.cli", "info", str(gguf), "--json", "-q"]
    first, second = (subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2))
    outputs = [process.communicate(timeout=600) for process in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], outputs
    paths = {json.loads(out)["path"] for out, _ in outputs}
    assert len(paths) == 1
    assert [p.name for p in Path(next(iter(paths))).parent.iterdir() if not p.name.endswith(".lock")] == [
        Path(next(iter(paths))).name]  # one conversion kept, no partial one left


# 9 -- quantize --help --------------------------------------------------------------------------------


def test_quantize_help_prints():
    done = cli("quantize", "--help")
    assert done.returncode == 0 and "13\u00a0% more size" in done.stdout


# 10 -- a truncated GGUF --------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [2 / 3, 0.004])
def test_a_truncated_gguf_is_called_incomplete(tiny_llama, tmp_path, keep):
    whole = write_llama_gguf(tiny_llama, tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(WorkbenchError, match="cut.gguf is incomplete.*download or copy it again"):
        resolve(str(cut))


# 11 -- a path that looks like a hub id -----------------------------------------------------------------


def test_a_missing_subfolder_is_called_a_missing_folder(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkbenchError, match="There is no folder models/tiny"):
        resolve("models/tiny")


def test_an_unknown_org_name_offline_says_there_is_no_such_folder_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkbenchError, match="There is no folder someone/thing here.*offline"):
        resolve("someone/thing")


# 12 -- a tokenizer shipping code -----------------------------------------------------------------------


def test_a_tokenizer_with_code_is_refused_before_any_work(tiny_llama, tmp_path):
    folder = copy_model(tiny_llama, tmp_path / "custom-tokenizer")
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="MyTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_my.MyTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenization_my.py").write_text(marker_code(marker) + (
        "from transformers import PreTrainedTokenizerFast\nclass MyTokenizer(PreTrainedTokenizerFast):\n    pass\n"))
    with pytest.raises(WorkbenchError, match="tokenizer needs to run Python code.*--trust-remote-code"):
        quantize_run(str(folder), tmp_path / "run", QuantSettings(method="gptq"))
    assert not marker.exists() and not (tmp_path / "run").exists()
    inspect_folder(folder, trust_remote_code=True)  # trusted, it loads
    assert marker.exists()


# 13 -- the disk fills up while the model is saved ---------------------------------------------------------


def _small_file_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_saving_gives_a_message_and_leaves_nothing(tiny_llama, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    # The tiny model's fp32 weights file is 400 kB: its write fails, the configs before it do not.
    done = cli("quantize", str(tiny_llama), "-o", str(runs / "run"), "--method", "rtn", "-q",
               preexec_fn=_small_file_limit(200_000))
    assert done.returncode == 2, done.stderr
    assert "File too large; there is no room for it there. Nothing was kept" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(runs.iterdir()) == []


# 14 -- a read-only run folder --------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` read-only for this process: a read-only bind mount for root (which ignores permissions)."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)


@pytest.fixture
def own_run(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def test_report_on_a_read_only_run_says_so(own_run):
    with read_only(own_run):
        done = cli("report", str(own_run), "-q")
    assert done.returncode == 2 and "Read-only file system" in done.stderr or "Permission denied" in done.stderr
    assert "Copy the folder to a place you can write to" in done.stderr and "Traceback" not in done.stderr


def test_evaluate_on_a_read_only_run_prints_the_figures_and_says_they_were_not_saved(own_run, text_file):
    before = (own_run / "run.json").read_bytes()
    with read_only(own_run):
        done = cli("evaluate", str(own_run), "--text", str(text_file), "-q")
    assert done.returncode == 2
    assert "perplexity" in done.stdout and "top-1 agreement" in done.stdout
    assert "measured but could not be saved" in done.stderr and "Traceback" not in done.stderr
    assert (own_run / "run.json").read_bytes() == before


# 15 -- a run folder missing its weights ----------------------------------------------------------------


@pytest.mark.parametrize("command", [["evaluate", "--text", "TEXT"], ["compare", "--prompt", "hi"],
                                     ["bundle", "-o", "BUNDLE"]])
def test_a_run_missing_its_weights_file_is_called_incomplete(own_run, text_file, tmp_path, command):
    (own_run / "int4" / "model.onnx.data").unlink()
    args = [{"TEXT": str(text_file), "BUNDLE": str(tmp_path / "bundle")}.get(a, a) for a in command]
    done = cli(args[0], str(own_run), *args[1:], "-q")
    assert done.returncode == 2, done.stderr
    assert "int4 is incomplete: model.onnx.data, which holds the model's weights, is missing" in done.stderr
    assert not (tmp_path / "bundle").exists()


# 16 -- evaluate's numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(("window", "max_tokens", "message"), [
    (0, 8192, r"window must be at least 1 token \(--window\), not 0"),
    (512, 0, r"at least 32 tokens of text \(--max-tokens\), not 0"),
])
def test_evaluate_checks_its_numbers_first(tiny_run, text_file, window, max_tokens, message):
    with pytest.raises(WorkbenchError, match=message):
        evaluate_run(tiny_run, text_file, window=window, max_tokens=max_tokens)
