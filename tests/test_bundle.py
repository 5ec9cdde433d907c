"""Bundles of a tiny run: contents and manifest, the runner in a bare environment, chat formats,
verification against tampering, the Triton configuration, and the CLI."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tokenizers import Tokenizer

from exporters import triton
from exporters.bundle import (
    CHECK_PROMPT,
    ENGINE_FILE,
    GENAI_FILE,
    MANIFEST_FILE,
    RUNNER_DIR,
    RUNNER_FILES,
    build_bundle,
    verify_bundle,
)
from exporters.bundle.chat_template import chat_format_of
from exporters.bundle.genai import genai_unsupported
from exporters.runner import chat_format
from workbench.generation import engine
from workbench.generation.bench import bench_run
from workbench.errors import JobCancelled, WorkbenchError
from workbench.quality.evaluate import evaluate_run
from workbench.generation.engine import GenerationConfig
from workbench.run.pipeline import quantize_run
from workbench.run.folders import load_run
from workbench.generation.runtime import ChatModel
from workbench.settings import QuantSettings

from models import CHAT_TEMPLATE

PROMPT = "Write about the fox."
# SmolLM2-Instruct's template (the demo model): a default system message when none is given.
DEMO_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama 3 style: a BOS text first, contents trimmed.
TRIMMING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n\n{{ message['content'] | trim }}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n\n{% endif %}"
)
# Gemma style: no system role at all.
NO_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Numbers its turns: a single question composes, a conversation does not.
NUMBERED_TEMPLATE = (
    "{% for message in messages %}Turn {{ loop.index }} {{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_run(tiny_llama, tmp_path_factory) -> Path:
    """A tiny run with quality and speed measured, as a user's run would have before export."""
    run = tmp_path_factory.mktemp("bundle-run") / "run"
    quantize_run(str(tiny_llama), run, QuantSettings(method="rtn", block_size=16))
    text = tmp_path_factory.mktemp("text") / "fox.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    evaluate_run(run, text, max_tokens=256)
    bench_run(run, rounds=1, new_tokens=8, prompt_tokens=16)
    return run


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory) -> Path:
    return build_bundle(tiny_run, tmp_path_factory.mktemp("bundles") / "tiny-bundle").path


@pytest.fixture
def copy_of(tmp_path):
    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / folder.name))

    return copy


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def workbench_answer(model_dir: Path, prompt: str, config: GenerationConfig) -> str:
    model = ChatModel(model_dir, "cpu")
    return model.generate(model.encode(prompt), config).text


# -- contents ---------------------------------------------------------------------------------------


def test_bundle_holds_the_model_the_runner_and_a_manifest_of_every_file(tiny_run, bundle):
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    files = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {MANIFEST_FILE}
    assert set(files) == on_disk
    for required in ("model.onnx", "tokenizer.json", "config.json", "generation_config.json", "chat_template.jinja",
                     "runner.json", "README.md", "requirements.txt", "run.py", ENGINE_FILE, "chat_format.py"):
        assert required in files, required
    for path, entry in files.items():
        assert entry["bytes"] == (bundle / path).stat().st_size and entry["sha256"] == sha256(bundle / path)
    # One decode loop: the runner's engine is the workbench's, byte for byte.
    assert (bundle / ENGINE_FILE).read_bytes() == Path(engine.__file__).read_bytes()
    for name in RUNNER_FILES:
        assert (bundle / name).read_bytes() == (RUNNER_DIR / name).read_bytes()
    assert (bundle / "model.onnx").read_bytes() == (tiny_run / "int4" / "model.onnx").read_bytes()

    record = load_run(tiny_run)
    metrics = manifest["metrics"]
    assert metrics["size"]["size_ratio"] == record.size_ratio
    assert metrics["memory"]["int4_peak_rss_bytes"] == record.int4.peak_rss_bytes
    assert metrics["quality"] == [q.to_dict() for q in record.quality] and metrics["quality"][0]["text"] == "fox.txt"
    assert metrics["speed"]["int4"]["tokens_per_s"] == record.speed.int4["tokens_per_s"]
    assert metrics["speed"]["provider"] == "cpu" and metrics["speed"]["machine"] == record.speed.machine
    assert manifest["schema_version"] == 1 and manifest["source"]["name"] == record.source.name
    assert manifest["check"]["prompt"] == CHECK_PROMPT and manifest["check"]["tokens"]

    requirements = (bundle / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if line and not line.startswith("#"))
    assert set(pins) == {"onnxruntime", "tokenizers", "numpy"}
    assert pins["tokenizers"] == importlib.metadata.version("tokenizers")


def test_model_card_front_matter_and_plain_words(bundle):
    text = (bundle / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    card = yaml.safe_load(front)
    assert set(card["tags"]) >= {"onnx", "int4", "matmulnbits"} and card["license"]
    assert "base_model" not in card  # a local folder: no hub id to name
    assert "python run.py" in body and "smaller" in body and "perplexity" in body
    assert "licence was not recorded" in body


def test_genai_config_only_for_graphs_it_was_checked_on(bundle, tiny_run, tmp_path):
    config = json.loads((bundle / GENAI_FILE).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == "model.onnx" and decoder["inputs"]["position_ids"] == "position_ids"
    assert config["model"]["type"] == "llama"
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    assert manifest["genai"]["written"]
    assert "checked here only on" in genai_unsupported("phi3", tiny_run / "int4")
    hybrid = Path(shutil.copytree(tiny_run / "int4", tmp_path / "int4"))
    tokenizer = json.loads((hybrid / "tokenizer.json").read_text())
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
    (hybrid / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert "decoder is Sequence" in genai_unsupported("llama", hybrid)


@pytest.mark.skipif(not os.environ.get("INT4_WORKBENCH_GENAI_PYTHON"),
                    reason="set INT4_WORKBENCH_GENAI_PYTHON to a Python with onnxruntime-genai")
def test_onnxruntime_genai_gives_the_recorded_answer(bundle):
    script = (
        "import json, sys, onnxruntime_genai as og\n"
        "check = json.load(open(sys.argv[2]))['check']\n"
        "model = og.Model(sys.argv[1]); params = og.GeneratorParams(model)\n"
        "params.set_search_options(do_sample=False, max_length=len(check['prompt_ids']) + check['max_new_tokens'])\n"
        "generator = og.Generator(model, params); generator.append_tokens(check['prompt_ids']); tokens = []\n"
        "while not generator.is_done():\n"
        "    generator.generate_next_token(); tokens.append(int(generator.get_next_tokens()[0]))\n"
        "print(json.dumps(tokens))\n"
    )
    result = subprocess.run([os.environ["INT4_WORKBENCH_GENAI_PYTHON"], "-c", script, str(bundle),
                             str(bundle / MANIFEST_FILE)], capture_output=True, text=True, timeout=120, check=True)
    recorded = json.loads((bundle / MANIFEST_FILE).read_text())["check"]["tokens"]
    assert json.loads(result.stdout)[: len(recorded)] == recorded


# -- the runner on its own ------------------------------------------------------------------------------


def runner_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions pip would install for requirements.txt, and their dependencies."""
    wanted = ["onnxruntime-gpu" if _installed("onnxruntime-gpu") else "onnxruntime", "tokenizers", "numpy"]
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        name = canonicalize_name(wanted.pop())
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(name)
        for line in found[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.append(requirement.name)
    return list(found.values())


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A virtual environment holding only the runner's packages (linked from this one: no network)."""
    venv = tmp_path_factory.mktemp("runner-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for distribution in runner_distributions():
        for file in distribution.files or []:
            source = Path(distribution.locate_file(file))
            if file.parts[0] == ".." or not source.is_file():  # console scripts live outside site-packages
                continue
            target = site / file
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(source)
    return python


def bare_env() -> dict[str, str]:
    """A clean environment: no PYTHONPATH or the like letting the workbench in."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}


def run_runner(python: Path, bundle: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "run.py", *args], cwd=bundle, capture_output=True, text=True, timeout=120, check=False,
        env=bare_env(),
    )


def test_runner_needs_no_workbench_and_writes_the_workbench_text(bare_python, bundle, tiny_run, tmp_path):
    probe = subprocess.run(
        [str(bare_python), "-c", "import importlib.util as u, onnxruntime, tokenizers, numpy;"
         "print([m for m in ('torch', 'transformers', 'jinja2', 'workbench') if u.find_spec(m)])"],
        capture_output=True, text=True, check=True, cwd=tmp_path, env=bare_env(),
    )
    assert probe.stdout.strip() == "[]"

    greedy = run_runner(bare_python, bundle, "--prompt", PROMPT, "--max-new-tokens", "24", "--provider", "cpu")
    assert greedy.returncode == 0, greedy.stderr
    expected = workbench_answer(tiny_run / "int4", PROMPT, GenerationConfig(max_new_tokens=24))
    assert expected and greedy.stdout == expected + "\n"

    sampled = run_runner(bare_python, bundle, "--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "0.9",
                         "--top-k", "20", "--seed", "7")
    assert sampled.returncode == 0, sampled.stderr
    config = GenerationConfig(max_new_tokens=24, temperature=0.9, top_k=20, seed=7)
    assert sampled.stdout == workbench_answer(tiny_run / "int4", PROMPT, config) + "\n"

    talk = subprocess.run([str(bare_python), "run.py", "--max-new-tokens", "4", "--provider", "cpu"], cwd=bundle,
                          input="Hello\nAnd again\n/exit\n", capture_output=True, text=True, timeout=120, check=False,
                          env=bare_env())
    assert talk.returncode == 0 and talk.stderr.count("tokens/s") == 2, talk.stderr

    refused = run_runner(bare_python, bundle, "--prompt", "Hi", "--no-chat", "--system", "Be brief.")
    assert refused.returncode == 2 and "system prompt" in refused.stderr


# -- chat formats ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", [CHAT_TEMPLATE, DEMO_TEMPLATE, TRIMMING_TEMPLATE, NO_SYSTEM_TEMPLATE],
    ids=["tiny", "demo", "trimming", "no-system"],
)
def test_runner_prompt_ids_equal_the_workbench_ones(tiny_run, tmp_path, template):
    model_dir = Path(shutil.copytree(tiny_run / "int4", tmp_path / "int4"))
    (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    model = ChatModel(model_dir, "cpu")
    chat = chat_format_of(model.tokenizer)
    assert chat["multi_turn"]
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for prompt in ("Hello, who are you?", "  spaced out \n", "{\"json\": [1, 2]}"):
        expected = model.encode(prompt)
        assert chat_format.encode(tokenizer, chat, [{"role": "user", "content": prompt}]) == expected
        if chat["system_start"] is not None:
            system = [{"role": "system", "content": "Be brief."}]
            ids = chat_format.encode(tokenizer, chat, [*system, {"role": "user", "content": prompt}])
            assert ids == model.encode(prompt, system="Be brief.")
    assert (chat["system_start"] is None) == (template == NO_SYSTEM_TEMPLATE)
    assert chat["strip_content"] == (template == TRIMMING_TEMPLATE)


def test_a_template_that_numbers_turns_answers_one_question_at_a_time(tiny_run, tmp_path):
    model_dir = Path(shutil.copytree(tiny_run / "int4", tmp_path / "int4"))
    (model_dir / "chat_template.jinja").write_text(NUMBERED_TEMPLATE, encoding="utf-8")
    chat = chat_format_of(ChatModel(model_dir, "cpu").tokenizer)
    assert not chat["multi_turn"]
    assert chat_format.render(chat, [{"role": "user", "content": "Hi"}]) == "Turn 1 user: Hi\nassistant:"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "Bye"}]
    with pytest.raises(chat_format.ChatFormatError, match="more than one question"):
        chat_format.render(chat, conversation)


# -- verify ----------------------------------------------------------------------------------------------


def test_verify_accepts_an_intact_bundle_and_its_zip(tiny_run, bundle, tmp_path):
    result = verify_bundle(bundle)
    assert result.ok, result.to_dict()
    assert [c.name for c in result.checks] == ["files", "answer"]
    zipped = build_bundle(tiny_run, tmp_path / "tiny", zip_file=True)
    assert zipped.path == tmp_path / "tiny.zip" and sorted(p.name for p in tmp_path.iterdir()) == ["tiny.zip"]
    with zipfile.ZipFile(zipped.path) as archive:
        assert all(name.startswith("tiny/") for name in archive.namelist())
    assert verify_bundle(zipped.path).ok


def test_verify_refuses_a_flipped_byte_a_missing_file_and_an_added_one(bundle, copy_of):
    flipped = copy_of(bundle)
    data = bytearray((flipped / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (flipped / "model.onnx").write_bytes(bytes(data))
    result = verify_bundle(flipped)
    assert not result.ok and "model.onnx was changed" in result.checks[0].detail
    assert result.checks[1].detail.startswith("not run")

    (flipped / "model.onnx").unlink()
    (flipped / "numpy.py").write_text("raise SystemExit('shadowed')\n")
    detail = verify_bundle(flipped).checks[0].detail
    assert "model.onnx is missing" in detail and "numpy.py is not part of the bundle" in detail


def test_verify_refuses_a_bundle_without_a_readable_manifest(bundle, copy_of):
    damaged = copy_of(bundle)
    (damaged / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(WorkbenchError, match="damaged"):
        verify_bundle(damaged)
    (damaged / MANIFEST_FILE).unlink()
    with pytest.raises(WorkbenchError, match="not a bundle"):
        verify_bundle(damaged)


def test_verify_refuses_a_changed_answer(bundle, copy_of):
    """A manifest rewritten to claim another answer (checksums then fit again) is caught by generating."""
    forged = copy_of(bundle)
    manifest = json.loads((forged / MANIFEST_FILE).read_text())
    manifest["check"]["tokens"] = [t + 1 for t in manifest["check"]["tokens"]]
    (forged / MANIFEST_FILE).write_text(json.dumps(manifest))
    result = verify_bundle(forged)
    assert result.checks[0].ok and not result.checks[1].ok
    assert "differs from the recorded one from token 0" in result.checks[1].detail


@pytest.mark.parametrize(
    ("member", "why"),
    [("../escaped.txt", "climbs out"), ("/tmp/int4-absolute.txt", "absolute path"), ("link", "symbolic link"),
     ("C:/windows.txt", "absolute path"), ("a\\..\\..\\b.txt", "backslash")],
)
def test_verify_refuses_unsafe_zip_entries_and_extracts_nothing(bundle, tmp_path, member, why):
    archive_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.write(bundle / MANIFEST_FILE, f"evil/{MANIFEST_FILE}")
        if member == "link":
            entry = zipfile.ZipInfo("evil/link")
            entry.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(entry, "/etc/passwd")
        else:
            archive.writestr(member, "payload")
    before = set(Path("/tmp").iterdir())
    with pytest.raises(WorkbenchError, match=why) as error:
        verify_bundle(archive_path)
    assert "nothing was extracted" in str(error.value)
    assert not (tmp_path / "escaped.txt").exists() and not Path("/tmp/int4-absolute.txt").exists()
    assert {p for p in set(Path("/tmp").iterdir()) - before if p.name.startswith("int4-verify-")} == set()


# -- writing safely ----------------------------------------------------------------------------------------


def test_existing_output_is_refused_and_cancel_leaves_nothing(tiny_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(WorkbenchError, match="already exists"):
        build_bundle(tiny_run, taken)
    for zip_file in (False, True):
        calls = []

        def cancelled(calls=calls) -> bool:
            calls.append(1)
            return len(calls) > 3

        with pytest.raises(JobCancelled):
            build_bundle(tiny_run, tmp_path / "cancelled", zip_file=zip_file, cancelled=cancelled)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    with pytest.raises(WorkbenchError, match="Unknown bundle target"):
        build_bundle(tiny_run, tmp_path / "x", target="docker")


def test_a_bundle_answering_unlike_the_workbench_is_not_written(tiny_run, tmp_path, monkeypatch):
    real = chat_format_of

    def skewed(tokenizer):
        chat = real(tokenizer)
        chat["generation_prompt"] += " "
        return chat

    monkeypatch.setattr("exporters.bundle.write.chat_format_of", skewed)
    with pytest.raises(RuntimeError, match="bug in the bundle writer"):
        build_bundle(tiny_run, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


# -- Triton ------------------------------------------------------------------------------------------------


def test_triton_repository_matches_the_graph(tiny_run, tmp_path):
    import onnxruntime as ort

    result = build_bundle(tiny_run, tmp_path / "repo", target="triton", name="Tiny Llama!")
    repo = result.path
    model = repo / "tiny-llama" / "1" / "model.onnx"
    assert model.is_file() and not (repo / "run.py").exists() and not (repo / GENAI_FILE).exists()
    config = triton.parse_pbtxt((repo / "tiny-llama" / triton.CONFIG_FILE).read_text())
    assert config["name"] == ["tiny-llama"] and config["platform"] == ["onnxruntime_onnx"]
    assert config["max_batch_size"] == [0]
    # Compared with what ONNX Runtime itself reports of the graph, not with the writer's own reading.
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    types = {"tensor(int64)": "TYPE_INT64", "tensor(float)": "TYPE_FP32"}
    for field, values in (("input", session.get_inputs()), ("output", session.get_outputs())):
        written = {entry["name"][0]: entry for entry in config[field]}
        assert list(written) == [v.name for v in values]
        for value in values:
            entry = written[value.name]
            assert entry["data_type"] == [types[value.type]]
            assert entry["dims"] == [d if isinstance(d, int) else -1 for d in value.shape]
    assert any(e["name"][0] == "past_key_values.0.key" for e in config["input"])
    assert verify_bundle(repo).ok


def test_triton_config_check_catches_a_mismatch(tiny_run):
    model = tiny_run / "int4" / "model.onnx"
    inputs, outputs = triton.graph_interface(model)
    triton.check_config(triton.render_config("m", inputs, outputs), "m", model)
    with pytest.raises(RuntimeError, match="input attention_mask of the graph is missing"):
        triton.check_config(triton.render_config("m", inputs[:1] + inputs[2:], outputs), "m", model)
    wrong = [triton.TensorSpec(inputs[0].name, "TYPE_INT32", inputs[0].dims), *inputs[1:]]
    with pytest.raises(RuntimeError, match="input input_ids is"):
        triton.check_config(triton.render_config("m", wrong, outputs), "m", model)


def test_pbtxt_parser_reads_comments_nesting_and_lists():
    text = '# c\nname: "a"\nmax_batch_size: 0\ninput [ { name: "x" dims: [ -1, 3 ] }, { name: "y" } ]\nopt { k: V }\n'
    parsed = triton.parse_pbtxt(text)
    assert parsed == {"name": ["a"], "max_batch_size": [0], "input": [{"name": ["x"], "dims": [-1, 3]},
                      {"name": ["y"]}], "opt": [{"k": ["V"]}]}


# -- command line ------------------------------------------------------------------------------------------


def test_cli_bundle_and_verify(tiny_run, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                              timeout=300, check=False)

    made = cli("bundle", str(tiny_run), "-o", str(tmp_path / "b"), "--json", "-q")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["path"] == str(tmp_path / "b")
    checked = cli("verify", str(tmp_path / "b"), "--json", "-q")
    assert checked.returncode == 0 and json.loads(checked.stdout)["ok"]
    (tmp_path / "b" / "README.md").write_text("changed")
    failed = cli("verify", str(tmp_path / "b"), "-q")
    assert failed.returncode == 1 and "FAIL files: README.md has 7 bytes" in failed.stdout
    missing = cli("verify", str(tmp_path / "nothing"), "-q")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
