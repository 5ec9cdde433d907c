"""Peak RAM and time of `quantize` from a GGUF: an older tree (transformers' fp32 conversion first)
against this one (the GGUF read tensor by tensor), run alternately, each with an empty cache.

    flock /work/notes/bench.lock python benchmarks/gguf_scale.py 1b --before /work/main --dir /work/bench/gguf
    flock /work/notes/bench.lock python benchmarks/gguf_scale.py demo --before /work/main --dir /work/bench/gguf

`1b` writes a Llama-3.2-1B-shaped random model as a Q8_0 GGUF (norms in fp32, tied embeddings, a
byte-level tokenizer of the real vocabulary size), tensor by tensor; `demo` quantizes the demo
model's GGUF (Q4_1) and then once more with the cache the first run left (what a second run costs).
The RSS of the whole process tree is sampled every 0.25 s per stage (benchmarks/scale.py). The
GGUF, the runs and the caches are deleted afterwards unless --keep. One JSON object is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale import QUANTIZE, ROOT, SHAPES, machine_state, sampled  # noqa: E402 (after sys.path)


def write_gguf(path: Path, shape: dict) -> int:
    """A random Llama of `shape` as a Q8_0 GGUF, one tensor in memory at a time; its parameter count."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    q8 = gguf.GGMLQuantizationType.Q8_0
    h, heads, kv, head_dim = (shape[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                  "head_dim"))
    mlp, vocab = shape["intermediate_size"], shape["vocab_size"]
    tensors = [("token_embd.weight", (vocab, h))]
    for i in range(shape["num_hidden_layers"]):
        tensors += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.attn_q.weight", (heads * head_dim, h)),
                    (f"blk.{i}.attn_k.weight", (kv * head_dim, h)), (f"blk.{i}.attn_v.weight", (kv * head_dim, h)),
                    (f"blk.{i}.attn_output.weight", (h, heads * head_dim)), (f"blk.{i}.ffn_norm.weight", (h,)),
                    (f"blk.{i}.ffn_gate.weight", (mlp, h)), (f"blk.{i}.ffn_up.weight", (mlp, h)),
                    (f"blk.{i}.ffn_down.weight", (h, mlp))]
    tensors.append(("output_norm.weight", (h,)))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("bench-llama-1b")
    writer.add_context_length(shape["max_position_embeddings"])
    writer.add_embedding_length(h)
    writer.add_block_count(shape["num_hidden_layers"])
    writer.add_feed_forward_length(mlp)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shape["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    alphabet = list(bytes_to_unicode().values())
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens = special + alphabet + ["to", "ok"] + [f"tok{i}" for i in range(vocab - len(alphabet) - 4)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    writer.add_token_merges(["t o", "o k"])  # two: a one-element array reads back as a plain string
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    block, type_size = gguf.GGML_QUANT_SIZES[q8]
    for name, dims in tensors:
        if len(dims) == 1:
            writer.add_tensor_info(name, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            writer.add_tensor_info(name, (dims[0], dims[1] // block * type_size), np.dtype(np.uint8),
                                   dims[0] * dims[1] // block * type_size, raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.02 * 3**0.5 / 127).tobytes(), np.uint8)  # uniform values of std 0.02
    for _name, dims in tensors:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, np.float32))
            continue
        blocks = np.empty((dims[0] * dims[1] // block, type_size), np.uint8)
        blocks[:, :2] = scale
        blocks[:, 2:] = rng.integers(-127, 128, (blocks.shape[0], block), np.int8).view(np.uint8)
        writer.write_tensor_data(blocks)
        del blocks
    writer.close()
    return sum(int(np.prod(dims)) for _, dims in tensors)


def quantize(tree: Path, spec: str, work: Path, method: str, cache: Path) -> dict:
    """One `quantize` run of `tree`'s code with the workbench cache in `cache`; its peaks and timings."""
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "INT4_WORKBENCH_CACHE": str(cache)}
    # -P: not the working directory (this tree) first on the path, but the tree under test
    result = sampled([sys.executable, "-P", "-c", QUANTIZE, spec, str(run_dir), method], env)
    result.pop("stdout")
    if result["returncode"] == 0:
        record = json.loads((run_dir / "run.json").read_text())
        result["peak_through_int4_gib"] = max(v for k, v in result["peak_gib"].items() if k != "measure")
        result["timings_s"] = {k: round(v, 1) for k, v in record["timings_s"].items()}
        result["graph"] = "built" if "built" in record["graph"] else record["graph"].get("attention")
    result["cache_gib"] = round(sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 2**30, 2)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["1b", "demo"])
    parser.add_argument("--before", type=Path, required=True, help="the tree to compare with (e.g. /work/main)")
    parser.add_argument("--dir", type=Path, default=Path.home() / ".cache" / "int4-workbench-gguf-scale")
    parser.add_argument("--method", default="rtn")
    parser.add_argument("--repeat", type=int, default=1, help="alternating before/after pairs")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    trees = {"before": args.before.resolve(), "after": ROOT}
    result = {"model": args.model, "method": args.method, "trees": {k: str(v) for k, v in trees.items()},
              "machine_before": machine_state(), "runs": []}
    gguf = args.dir / "llama-1b-q8_0.gguf"
    try:
        if args.model == "1b":
            if not gguf.is_file():
                result["parameters"] = write_gguf(gguf, SHAPES["1b"])
            result["gguf_gib"] = round(gguf.stat().st_size / 2**30, 2)
        spec = str(gguf) if args.model == "1b" else "demo"
        for repeat in range(args.repeat):
            for label, tree in trees.items():
                cache = args.dir / f"cache-{label}"
                shutil.rmtree(cache, ignore_errors=True)
                runs = [quantize(tree, spec, args.dir, args.method, cache)]
                if args.model == "demo":  # again, with what the first run cached
                    runs.append(quantize(tree, spec, args.dir, args.method, cache))
                for index, run in enumerate(runs):
                    result["runs"].append({"tree": label, "repeat": repeat, "cache": ["empty", "warm"][index], **run})
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        result["machine_after"] = machine_state()
        if not args.keep:
            gguf.unlink(missing_ok=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
