"""Peak RAM and time of `quantize` (RTN unless --method says otherwise) and of the INT4 model answering, at real sizes.

    python benchmarks/scale.py 135m          # the demo's shape (SmolLM2-135M), random weights
    python benchmarks/scale.py 360m          # SmolLM2-360M-shaped (Llama architecture), tied embeddings
    python benchmarks/scale.py 1b            # Llama-3.2-1B-shaped, tied embeddings
    python benchmarks/scale.py 8b            # Llama-3.1-8B-shaped, untied
    python benchmarks/scale.py 8b --cache /big/disk --keep
    python benchmarks/scale.py 1b --method balanced   # GPTQ, data-free

A random-initialised model of the real shape is written as bf16 safetensors shards, tensor by
tensor (never a whole model or shard in RAM), with config.json and a word-level tokenizer of the
real vocabulary size. What `quantize --method rtn` runs (quantize_run) runs in a child; the RSS of the whole process tree is sampled
every 0.25 s and attributed to the stage that is running. Then the INT4 model answers as
`bench` measures it (workbench.generation.bench.measure_in_process in a fresh child), sampled the
same way. The model and the run are deleted afterwards unless --keep. One JSON object is printed,
with the machine's load (`uptime`) and memory (`free -g`) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.generation.bench import BENCH_TEXT  # noqa: E402 (after sys.path)
from workbench.units import format_size  # noqa: E402

SHAPES = {
    # SmolLM2-135M's shape (the demo's), random weights.
    "135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, head_dim=64,
                 rope_theta=100000.0, max_position_embeddings=8192),
    # SmolLM2-360M's shape.
    "360m": dict(hidden_size=960, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                 intermediate_size=2560, vocab_size=49152, tie_word_embeddings=True, head_dim=64,
                 rope_theta=100000.0, max_position_embeddings=8192),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, head_dim=64,
               rope_theta=500000.0, max_position_embeddings=131072),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, head_dim=128,
               rope_theta=500000.0, max_position_embeddings=131072),
}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHARD_BYTES = 2 * 10**9
SAMPLE_S = 0.25
STAGE = re.compile(r"^STAGE (.+)$")
# What `int4-workbench quantize MODEL -o RUN --method rtn` (or `--preset balanced`) runs, with each stage's start printed at once
# (the CLI's progress bar redraws at most twice a second, which would blur the stage boundaries).
QUANTIZE = """
import sys
from pathlib import Path
from workbench.run.pipeline import quantize_run
from workbench.settings import PRESETS, QuantSettings
seen = set()
def progress(fraction, message):
    stage, _, rest = message.partition(":")
    step = stage if stage != "gptq" else f"gptq/{rest.strip()}"  # GPTQ's steps: capture, each layer, lm_head
    if step not in seen:
        seen.add(step)
        print("STAGE", step, file=sys.stderr, flush=True)
settings = PRESETS[sys.argv[3]].settings if sys.argv[3] in PRESETS else QuantSettings(method=sys.argv[3])
quantize_run(sys.argv[1], Path(sys.argv[2]), settings, progress=progress)
"""


def tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama checkpoint, in the order Hugging Face writes them."""
    h, kv = shape["hidden_size"], shape["num_key_value_heads"] * shape["head_dim"]
    q, mlp, vocab = shape["num_attention_heads"] * shape["head_dim"], shape["intermediate_size"], shape["vocab_size"]
    names = [("model.embed_tokens.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        names += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (q, h)),
                  (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                  (f"{p}.self_attn.o_proj.weight", (h, q)), (f"{p}.post_attention_layernorm.weight", (h,)),
                  (f"{p}.mlp.gate_proj.weight", (mlp, h)), (f"{p}.mlp.up_proj.weight", (mlp, h)),
                  (f"{p}.mlp.down_proj.weight", (h, mlp))]
    names.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        names.append(("lm_head.weight", (vocab, h)))
    return names


def bf16_chunks(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """The tensor's bf16 bytes in chunks of about 64 MB: N(0, 0.02) for matrices, ones for norms."""
    count = int(np.prod(shape))
    if len(shape) == 1:
        yield np.full(count, 0x3F80, np.uint16).tobytes()  # 1.0
        return
    step = 32 * 2**20
    for start in range(0, count, step):
        values = rng.standard_normal(min(step, count - start), dtype=np.float32) * np.float32(0.02)
        yield (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16: the top half of fp32


def write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    header, offset = {}, 0
    for name, shape in entries:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in entries:
            for chunk in bf16_chunks(name, shape, rng):
                handle.write(chunk)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer of `vocab_size` ids (BOS 0, EOS 1) in `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<unk>"]
    # The bench prompt's words get their own ids, so the INT4 model reads a real token sequence.
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", BENCH_TEXT)))
    vocab = special + words
    vocab += [f"tok{i}" for i in range(vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special[0], eos_token=special[1],
                            unk_token=special[2]).save_pretrained(folder)


def write_model(folder: Path, size: str) -> int:
    """The model folder; returns its parameter count."""
    from transformers import LlamaConfig

    shape = SHAPES[size]
    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, shape["vocab_size"])
    config = LlamaConfig(**shape, rope_scaling=LLAMA3_ROPE, bos_token_id=0, eos_token_id=1,
                         torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    entries = tensors(shape)
    shards, current, current_bytes = [], [], 0
    for name, tensor_shape in entries:
        size_bytes = int(np.prod(tensor_shape)) * 2
        if current and current_bytes + size_bytes > SHARD_BYTES:
            shards.append(current)
            current, current_bytes = [], 0
        current.append((name, tensor_shape))
        current_bytes += size_bytes
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / filename, shard, rng)
        weight_map.update({name: filename for name, _ in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(int(np.prod(s)) for _, s in entries)


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def sampled(command: list[str], env: dict) -> dict:
    """Run `command`, sampling its process tree's RSS; peaks per stage the progress bar names."""
    began = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    process = psutil.Process(child.pid)
    state = {"stage": "start", "stderr": []}
    peaks: dict[str, int] = {}
    starts: dict[str, float] = {}

    def read_stderr():
        buffer = b""
        while chunk := child.stderr.read1(4096):
            buffer += chunk
            *lines, buffer = re.split(rb"[\r\n]", buffer)
            for line in lines:
                text = line.decode(errors="replace")
                match = STAGE.match(text)
                if match:
                    state["stage"] = match.group(1)
                    # Echoed as it happens, so a long run that is stopped still shows how far it got.
                    print(f"{time.perf_counter() - began:7.1f} s  {match.group(1)}  (peak so far "
                          f"{format_size(max(peaks.values(), default=0))})", file=sys.stderr, flush=True)
                elif text.strip():
                    state["stderr"].append(text)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    while child.poll() is None:
        starts.setdefault(state["stage"], round(time.perf_counter() - began, 1))
        try:
            rss = tree_rss(process)
        except psutil.NoSuchProcess:
            break
        peaks[state["stage"]] = max(peaks.get(state["stage"], 0), rss)
        time.sleep(SAMPLE_S)
    stdout = child.stdout.read().decode()
    child.wait()
    reader.join(timeout=5)
    return {"returncode": child.returncode, "wall_s": round(time.perf_counter() - began, 1),
            "peak_gib": {k: round(v / 2**30, 2) for k, v in peaks.items()},
            "started_s": starts,
            "stdout": stdout, "stderr_tail": state["stderr"][-15:]}


def machine_state() -> dict:
    free = subprocess.run(["free", "-g"], capture_output=True, text=True, check=True).stdout.strip().splitlines()
    return {"uptime": subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip(), "free_g": free[:2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("size", choices=sorted(SHAPES))
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "int4-workbench-scale")
    parser.add_argument("--keep", action="store_true", help="keep the model and the run folder")
    parser.add_argument("--method", default="rtn", help="rtn, hqq, gptq, or a preset name (balanced)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    model_dir, run_dir = args.cache / f"llama-{args.size}", args.cache / f"run-{args.size}"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = {"size": args.size, "method": args.method, "shape": SHAPES[args.size], "before": machine_state()}
    try:
        began = time.perf_counter()
        if not (model_dir / "config.json").is_file():
            result["parameters"] = write_model(model_dir, args.size)
        result["model_write_s"] = round(time.perf_counter() - began, 1)
        result["model_gib"] = round(sum(p.stat().st_size for p in model_dir.iterdir()) / 2**30, 2)
        quantize = sampled([sys.executable, "-c", QUANTIZE, str(model_dir), str(run_dir), args.method], env)
        result["quantize"] = {k: v for k, v in quantize.items() if k != "stdout"}
        if quantize["returncode"] != 0:
            raise SystemExit(json.dumps(result, indent=2))
        record = json.loads((run_dir / "run.json").read_text())
        through_int4 = [v for k, v in quantize["peak_gib"].items() if k != "measure"]
        stage_peaks = {}  # GPTQ's steps folded into one stage figure
        for step, peak in quantize["peak_gib"].items():
            stage = step.split("/", 1)[0]
            stage_peaks[stage] = max(stage_peaks.get(stage, 0), peak)
        result["quantize"].update(
            peak_through_int4_gib=max(through_int4), stage_peak_gib=stage_peaks, timings_s=record["timings_s"],
            int4_gib=round(record["int4"]["bytes"] / 2**30, 2), original=record["original"].get("skipped", "built"),
            measured_peak_rss_gib={k: round(record[k]["peak_rss_bytes"] / 2**30, 2) if record[k]["peak_rss_bytes"]
                                   else None for k in ("original", "int4")},
        )
        bench = sampled([sys.executable, "-c", (
            "import json, sys; from workbench.generation.bench import measure_in_process; "
            f"print(json.dumps(measure_in_process({str(run_dir / 'int4')!r}, 'cpu', None, {args.new_tokens}, "
            f"{args.prompt_tokens})))")], env)
        result["bench_int4"] = {k: v for k, v in bench.items() if k != "stdout"}
        if bench["returncode"] == 0:
            measured = json.loads(bench["stdout"].strip().splitlines()[-1])
            result["bench_int4"].update(
                tokens_per_s=round(measured["tokens_per_s"], 2), ttft_s=round(measured["ttft_s"], 2),
                own_peak_rss_gib=round(measured["peak_rss_bytes"] / 2**30, 2))
    finally:
        result["after"] = machine_state()
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
