"""The command line: `int4-workbench info|quantize|tune|evaluate|compare|bench|report|bundle|verify ...`.

Human-readable output and progress bars go to stderr; `--json` prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from workbench import __version__
from workbench.errors import JobCancelled, NotSaved, Terminated, WorkbenchError
from workbench.jobs import Progress
from workbench.units import format_size
from workbench.settings import DEFAULT_PRESET, METHODS, PRESETS, preset_settings

PROVIDER_CHOICES = ("auto", "cpu", "cuda")  # workbench.generation.runtime.choose_provider's; importing it loads onnxruntime
PROGRESS_WIDTH = 60  # characters of the stage's message beside the bar, which fits an 80-column terminal


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A tqdm bar on stderr showing the current stage; a silent sink when disabled."""
    from tqdm import tqdm

    bar = tqdm(
        total=1000, file=sys.stderr, disable=not enabled, bar_format="{l_bar}{bar}| {elapsed}", leave=False,
        mininterval=0.5,
    )

    def report(fraction: float, message: str) -> None:
        bar.set_description_str(shorten(message), refresh=False)
        bar.update(int(max(0.0, min(fraction, 1.0)) * 1000) - bar.n)  # update() rate-limits redraws

    try:
        yield report
    finally:
        bar.close()


def shorten(message: str, width: int = PROGRESS_WIDTH) -> str:
    """`message` in at most `width` characters for the progress line, keeping its start (the stage) and its end
    (the count: "token 147 of 256")."""
    if len(message) <= width:
        return message
    head = width // 3
    return f"{message[:head]}…{message[len(message) - (width - head - 1):]}"


def emit(args: argparse.Namespace, data: dict, human: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(human)


class _Kept:
    """Figures measured but not saved (a read-only run folder) are still shown, then the reason why not."""

    def __init__(self) -> None:
        self.error: NotSaved | None = None

    def __call__(self, step):
        try:
            return step()
        except NotSaved as error:
            self.error = error
            return error.result

    def finish(self) -> int:
        if self.error is not None:
            raise self.error
        return 0


def cmd_info(args: argparse.Namespace) -> int:
    from workbench.run.memory import (
        NO_FIT,
        fit_verdict,
        original_sizes,
        preset_estimates,
        ram_estimates,
    )
    from workbench.durations import rough_duration
    from workbench.run.pipeline import plan_run
    from workbench.sources import resolve

    with progress_bar(not args.quiet) as progress:
        model = resolve(args.model, trust_remote_code=args.trust_remote_code, progress=progress)
    info = model.info
    presets = preset_estimates(info)
    plans = {name: plan_run(model, preset.settings, opens_model=True) for name, preset in PRESETS.items()}
    default = plans[DEFAULT_PRESET]
    ram = ram_estimates(info, PRESETS[DEFAULT_PRESET].settings, default.streamed)
    fp32_onnx = sum(original_sizes(info).values())
    data = {
        "name": info.name,
        "kind": info.kind,
        "path": info.path,
        "architecture": info.architecture,
        "model_type": info.model_type,
        "parameters": info.parameters,
        "layers": info.layers,
        "hidden_size": info.hidden_size,
        "vocab_size": info.vocab_size,
        "context_length": info.context_length,
        "tied_embeddings": info.tied_embeddings,
        "size_bytes": {"fp32": info.fp32_bytes, "fp16": info.fp16_bytes},
        "int4_bytes": presets,
        "size_ratio": {name: round(fp32_onnx / size, 2) for name, size in presets.items()},
        "ram_bytes": ram,
        "estimates": {name: plan.to_dict() for name, plan in plans.items()},
    }
    lines = [
        f"{info.name} ({info.architecture}, {info.kind})",
        f"  parameters      {info.parameters:,} in {info.layers} layers, hidden {info.hidden_size}, "
        f"vocabulary {info.vocab_size:,}",
        f"  context length  {info.context_length:,} tokens" if info.context_length else "  context length  unknown",
        f"  tied embeddings {'yes' if info.tied_embeddings else 'no'}",
        f"  size now        {format_size(info.fp32_bytes)} fp32, {format_size(info.fp16_bytes)} fp16",
    ]
    for name, size in presets.items():
        lines.append(f"  INT4 {name:<10} {format_size(size)} ({fp32_onnx / size:.1f}x smaller)  {PRESETS[name].description}")
    free = ram["machine_available"]
    data["fit"] = {step: fit_verdict(ram[step], free) for step in ("shrink", "run_original", "run_int4")}
    lines += [
        f"  this machine    {format_size(ram['machine_total'])} RAM, {format_size(free)} free",
        f"  to run          the original about {format_size(default.run_original_ram)}: "
        f"{data['fit']['run_original']}"
        + (" (a run skips it and measures the INT4 model alone)" if default.original_skipped else ""),
    ]
    for name, plan in plans.items():  # each preset: its time here, the RAM to shrink and to run what it writes
        lines.append(
            f"  {name:<15} {rough_duration(plan.time.seconds)}; to shrink about {format_size(plan.shrink_ram)} "
            f"({plan.fit(plan.shrink_ram)}), its INT4 model runs in about {format_size(plan.run_int4_ram)} "
            f"({plan.fit(plan.run_int4_ram)})")
    lines.append(f"  times           {default.time.basis}")
    if default.fit(default.peak_ram) == NO_FIT and not default.original_skipped:
        lines.append(f"  warning         measuring both sides needs about {format_size(default.peak_ram)}: more than "
                     "this machine has free")
    if ram["gpu_free"] is not None:
        data["fit"]["run_int4_gpu"] = fit_verdict(ram["run_int4"], ram["gpu_free"])
        lines.append(f"  GPU             {format_size(ram['gpu_free'])} free: INT4 {data['fit']['run_int4_gpu']}")
    emit(args, data, "\n".join(lines))
    return 0


def _settings_from(args: argparse.Namespace):
    settings = preset_settings(args.preset)
    changes = {}
    for option, field in (("method", "method"), ("block_size", "block_size"), ("accuracy_level", "accuracy_level")):
        if getattr(args, option) is not None:
            changes[field] = getattr(args, option)
    if args.symmetric is not None:
        changes["symmetric"] = args.symmetric
    if args.eight_bit is not None:
        changes["eight_bit"] = tuple(args.eight_bit)
    if args.exclude is not None:
        changes["exclude"] = tuple(args.exclude)
    if args.no_embeddings:
        changes["quantize_embeddings"] = False
    if args.no_lm_head:
        changes["quantize_lm_head"] = False
    if args.act_order is not None:
        changes["act_order"] = args.act_order
    if args.sensitive_8bit is not None:
        changes["sensitive_8bit_pct"] = args.sensitive_8bit
    if args.calibration_samples is not None:
        changes["calibration_samples"] = args.calibration_samples
    return settings.replace(**changes) if changes else settings


def cmd_quantize(args: argparse.Namespace) -> int:
    import psutil

    from workbench.run.pipeline import quantize_run
    from workbench.run.wording import quantized_line

    settings = _settings_from(args)
    calibration = Path(args.calibration) if args.calibration else None
    if calibration is not None:
        from workbench.quantization.calibration import read_texts

        read_texts(calibration, tokens=settings.calibration_token_count)  # a bad file is refused before minutes of export
    with progress_bar(not args.quiet) as progress:
        record = quantize_run(
            args.model,
            Path(args.output),
            settings,
            calibration=calibration,
            trust_remote_code=args.trust_remote_code,
            preset=args.preset,
            original=not args.no_original,
            progress=progress,
            started=psutil.Process().create_time(),  # the time to start this command counts in the next estimate
        )
    data = {
        "run_dir": record.run_dir,
        "original": {"bytes": record.original.bytes, "peak_rss_bytes": record.original.peak_rss_bytes},
        "int4": {"bytes": record.int4.bytes, "peak_rss_bytes": record.int4.peak_rss_bytes},
        "size_ratio": record.size_ratio,
        "ram_ratio": record.ram_ratio,
        "bits_per_weight": record.bits_per_weight,
        "ops": record.ops,
        "timings_s": record.timings_s,
        "settings": record.settings.to_dict(),
    }
    emit(args, data, quantized_line(record))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from workbench.run.tune import tune_run
    from workbench.run.wording import tune_lines

    text = args.text or args.calibration
    if text is None:
        raise WorkbenchError(
            "tune needs a text to judge quality on: give --text FILE with a few pages like the texts the model "
            "will read (or --calibration FILE, which is then used for both)."
        )
    with progress_bar(not args.quiet) as progress:
        record = tune_run(
            args.model, Path(args.output), args.max_quality_loss, text=Path(text),
            calibration=Path(args.calibration) if args.calibration else None, tokens=args.tokens,
            trust_remote_code=args.trust_remote_code, progress=progress,
        )
    tune = record.tune
    data = {
        "run_dir": record.run_dir,
        "chosen": tune["chosen"],
        "within_budget": tune["within_budget"],
        "explanation": tune["explanation"],
        "budget_pct": tune["budget_pct"],
        "candidates": tune["candidates"],
        "size_ratio": record.size_ratio,
        "quality": record.quality[0].to_dict(),
        "sensitivity": record.sensitivity,
        "settings": record.settings.to_dict(),
        "timings_s": record.timings_s,
    }
    emit(args, data, "\n".join(tune_lines(record)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from workbench.quality.evaluate import evaluate_run

    kept = _Kept()
    with progress_bar(not args.quiet) as progress:
        result = kept(lambda: evaluate_run(
            Path(args.run_dir), Path(args.text), window=args.window, max_tokens=args.max_tokens,
            provider=args.provider, progress=progress,
        ))
    human = (
        f"{result.text}, {result.tokens:,} tokens: perplexity {result.original_perplexity:.2f} -> "
        f"{result.int4_perplexity:.2f} ({result.perplexity_increase_pct:+.1f} %), top-1 agreement "
        f"{result.top1_agreement * 100:.1f} %, mean KL {result.mean_kl:.4f}" if result.compared else
        f"{result.text}, {result.tokens:,} tokens: INT4 perplexity {result.int4_perplexity:.2f}; this run has no "
        "original to compare with"
    )
    emit(args, result.to_dict(), human)
    return kept.finish()


def cmd_report(args: argparse.Namespace) -> int:
    from workbench.layout import REPORT_FILE
    from workbench.run.folders import load_run
    from workbench.run.report import write_report
    from workbench.run.wording import verdict

    run_dir = Path(args.run_dir)
    record = load_run(run_dir)
    write_report(run_dir, record)
    emit(args, {"report": str(run_dir / REPORT_FILE), "verdict": verdict(record)}, verdict(record))
    return 0


def _generation_config(args: argparse.Namespace):
    from workbench.generation.engine import GenerationConfig, GenerationError

    try:
        return GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()), seed=args.seed,
        )
    except GenerationError as error:
        raise WorkbenchError(str(error)) from error


def _json_schema(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise WorkbenchError(f"Cannot read the JSON schema {path}: {error.strerror}.") from error
    except json.JSONDecodeError as error:
        raise WorkbenchError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}).") from error


def cmd_compare(args: argparse.Namespace) -> int:
    from workbench.generation.chat import folder, run_suite
    from workbench.generation.compare import CompareOptions, read_prompts, write_table
    from workbench.run.folders import load_run

    prompts = [args.prompt] if args.prompt is not None else read_prompts(Path(args.prompts))
    options = CompareOptions(
        config=_generation_config(args), provider=args.provider, system=args.system,
        json_schema=_json_schema(args.json_schema), speculative=args.speculative, draft_tokens=args.draft_tokens,
        batch_size=args.batch_size, truncate=args.truncate,
    )
    streaming = not args.json and len(prompts) == 1 and args.batch_size == 1
    skipped = load_run(Path(args.run_dir)).original.skipped  # then the INT4 model answers alone
    streamed = "int4" if skipped else "original"

    def show(model: str, index: int, token: int, piece: str) -> None:
        # Both models write at once; a terminal streams the original's answer, the INT4 one follows.
        if model == streamed:
            sys.stdout.write(piece)
            sys.stdout.flush()

    if streaming:
        sys.stdout.write(f"--- {streamed} ---\n")
    with progress_bar(not args.quiet and not streaming) as progress:
        result, conversation = run_suite(
            Path(args.run_dir), prompts, options, on_token=show if streaming else None, progress=progress
        )
    saved = folder(Path(args.run_dir)) / f"{conversation.id}.json"
    if args.out:
        write_table(result, Path(args.out))
    if args.json:
        print(json.dumps({**result.to_dict(), "conversation": str(saved)}, indent=2))
        return 0
    if streaming:
        print(f"\n--- int4 ---\n{result.rows[0]['int4']['text']}" if not skipped else "")
    from workbench.generation.compare import to_markdown

    lines = [] if streaming else [to_markdown(result)]
    for row in result.rows if streaming else []:
        lines.append("")
        for key in ("original", "int4"):
            entry = row[key]
            if entry is None:
                continue
            memory = f", peak RSS {format_size(entry['peak_rss_bytes'])}" if entry["peak_rss_bytes"] else ""
            lines.append(
                f"{key:>8}: {entry['tokens']} tokens, TTFT {entry['ttft_s']:.3f} s, {entry['tokens_per_s']:.1f} tok/s, "
                f"total {entry['total_s']:.2f} s{memory}"
            )
        agree = row["agreement"]
        if agree is not None:
            lines.append(
                f"agreement: first divergence {agree['first_divergence']}, tokens {agree['token_agreement']:.0%}, "
                f"chrF {agree['similarity']:.2f}"
            )
        if "judgement" in row:
            lines.append(f"judgement: {row['judgement']['sentence']}")
        if "speculative" in row:
            spec = row["speculative"]
            lines.append(
                f"speculative (int4 drafts, original verifies): acceptance {spec['acceptance_rate']:.0%}, "
                f"speed-up {spec['speedup']:.2f}x, identical to the original: {spec['identical_to_original']}"
            )
    if result.throughput:
        lines.append(
            "throughput: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s" for k, v in result.throughput.items() if isinstance(v, dict))
        )
    if skipped:
        lines.append(f"the INT4 model answered alone; the original was not run: {skipped}")
    lines.append(f"provider: {result.provider} ({result.provider_reason})")
    lines.append(f"saved: {saved}")
    print("\n".join(lines))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from workbench.generation.bench import bench_run

    kept = _Kept()
    with progress_bar(not args.quiet) as progress:
        data = kept(lambda: bench_run(
            Path(args.run_dir), provider=args.provider, rounds=args.rounds, threads=args.threads,
            new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, progress=progress,
        ))
    measured = [(key, data[key]) for key in ("original", "int4") if data[key] is not None]
    how = (f"{data['provider']}, median of {data['rounds']} {'alternating ' if len(measured) == 2 else ''}rounds, "
           f"{data['new_tokens']} tokens after a {data['prompt_tokens']}-token prompt")
    human = "\n".join(
        [
            f"{'':10}{'decode tok/s':>14}{'TTFT s':>10}{'RSS after load':>16}{'peak RSS':>12}",
            *(
                f"{key:10}{d['tokens_per_s']:>14.1f}{d['ttft_s']:>10.3f}{format_size(d['load_rss_bytes']):>16}"
                f"{format_size(d['peak_rss_bytes']):>12}"
                for key, d in measured
            ),
            f"INT4 decodes {data['speedup']:.2f}x as fast and needs {data['memory_ratio']:.2f}x less peak RAM ({how})."
            if data["original"] else f"The INT4 model alone ({how}); this run has no original to compare with.",
        ]
    )
    emit(args, data, human)
    return kept.finish()


def cmd_bundle(args: argparse.Namespace) -> int:
    from exporters.bundle import build_bundle
    from exporters.serving import RAY_CONFIG_FILE, RayScale

    scaling = {"replicas": args.replicas, "min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
               "parallel": args.parallel}
    given = {key: value for key, value in scaling.items() if value is not None}
    with progress_bar(not args.quiet) as progress:
        result = build_bundle(
            Path(args.run_dir), Path(args.output), target=args.target, zip_file=args.zip, name=args.name,
            ray_scale=RayScale(**given) if given else None, progress=progress,
        )
    genai = "with genai_config.json" if result.genai["written"] else f"no genai_config.json: {result.genai['reason']}"
    human = f"{result.path}: {result.target} bundle, {result.files} files, {format_size(result.bytes)}"
    if result.target != "triton":
        human += f"; {genai}"
    if result.target == "ray-serve":
        human += f"; start it with `serve run {RAY_CONFIG_FILE}` in the bundle"
    emit(args, result.to_dict(), human)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from exporters.bundle import verify_bundle

    with progress_bar(not args.quiet) as progress:
        result = verify_bundle(Path(args.bundle), provider=args.provider, progress=progress)
    human = "\n".join(f"{'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in result.checks)
    emit(args, result.to_dict(), human)
    return 0 if result.ok else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from exporters.bundle import build_bundle
    from exporters.serving import is_bundle, start_server

    source = Path(args.run_or_bundle)
    with tempfile.TemporaryDirectory(prefix="int4-serve-") as scratch:
        bundle = source
        if not is_bundle(source):  # a run folder: serve a fresh bundle of it, gone afterwards
            with progress_bar(not args.quiet) as progress:
                bundle = build_bundle(source, Path(scratch) / f"{source.name}-bundle", progress=progress).path
        server = start_server(bundle, host=args.host, port=args.port, api_key=args.api_key, parallel=args.parallel,
                              provider=args.provider)
        try:
            emit(args, {"url": server.url, "model": server.model, "curl": server.curl()},
                 f"Serving {server.model} at {server.url} (OpenAI API); Ctrl-C stops.\n{server.curl()}")
            sys.stdout.flush()
            return server.process.wait()
        except KeyboardInterrupt:  # the server got the same Ctrl-C and stops by itself
            return 0
        finally:
            server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="int4-workbench", description="Shrink a language model to INT4 ONNX and see what it cost."
    )
    parser.add_argument("--version", action="version", version=f"int4-workbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        return sub

    info = command("info", "Describe a model: size now, size after INT4, RAM needed.")
    info.add_argument("model", help="'demo', a Hugging Face folder, a .gguf file or a hub id (org/name)")
    info.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model")
    info.set_defaults(func=cmd_info)

    quantize = command("quantize", "Export a model to ONNX and quantize it to INT4 in a new run folder.")
    quantize.add_argument("model", help="'demo', a Hugging Face folder, a .gguf file or a hub id (org/name)")
    quantize.add_argument("-o", "--output", required=True, help="run folder to create (must not exist)")
    quantize.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                          help="; ".join(f"{n}: {p.description}" for n, p in PRESETS.items()).replace("%", "%%"))
    quantize.add_argument("--method", choices=METHODS, help="rounding method (overrides the preset)")
    quantize.add_argument("--block-size", type=int, help="weights per scale: 16-256, powers of two")
    symmetry = quantize.add_mutually_exclusive_group()
    symmetry.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None,
                          help="store a zero point per block")
    symmetry.add_argument("--symmetric", dest="symmetric", action="store_true", default=None,
                          help="no zero points")
    quantize.add_argument("--accuracy-level", type=int, choices=range(5),
                          help="MatMulNBits compute precision: 4 = int8 activations (fastest on CPU)")
    quantize.add_argument("--calibration", help="calibration text: .txt, .jsonl, .csv or .json")
    quantize.add_argument("--calibration-samples", type=int, help="number of calibration samples (default: 32; a model under 0.5 B "
                          "parameters that writes its own text writes 64 or 128, for about the same time)")
    quantize.add_argument("--eight-bit", nargs="*", metavar="LAYER",
                          help="layer name patterns kept at 8 bits, e.g. lm_head 'model.layers.0.*'")
    quantize.add_argument("--exclude", nargs="*", metavar="LAYER", help="layer name patterns kept at fp32")
    quantize.add_argument("--no-embeddings", action="store_true", help="keep the embeddings fp32")
    quantize.add_argument("--no-lm-head", action="store_true", help="keep the lm_head fp32")
    quantize.add_argument("--sensitive-8bit", type=float, metavar="PCT",
                          help="keep the layers most sensitive to rounding at 8 bits, spending at most PCT %% more size")
    quantize.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                          help="GPTQ: quantize important columns first (the presets do)")
    quantize.add_argument("--no-original", action="store_true",
                          help="do not keep the fp32 original: the INT4 model alone is measured, compared and bundled")
    quantize.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model")
    quantize.set_defaults(func=cmd_quantize)

    tune = command("tune", "Try several INT4 settings on one export and keep the smallest whose perplexity on "
                           "your text rises no more than a budget.")
    tune.add_argument("model", help="'demo', a Hugging Face folder, a .gguf file or a hub id (org/name)")
    tune.add_argument("--max-quality-loss", type=float, required=True, metavar="PCT",
                      help="largest perplexity increase accepted, in per cent (e.g. 5)")
    tune.add_argument("--text", help="text to judge quality on: .txt, .jsonl, .csv or .json (default: the calibration file)")
    tune.add_argument("--calibration", help="calibration text (default: the model writes its own)")
    tune.add_argument("--tokens", type=int, default=4096, help="tokens of the text each candidate is judged on")
    tune.add_argument("-o", "--output", required=True, help="run folder to create (must not exist)")
    tune.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model")
    tune.set_defaults(func=cmd_tune)

    evaluate = command("evaluate", "Perplexity, top-1 agreement and KL of INT4 against the original on a text.")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--text", required=True, help="a text file (.txt, .jsonl, .csv, .json)")
    evaluate.add_argument("--max-tokens", type=int, default=8192, help="tokens of the text to score")
    evaluate.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    evaluate.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES)
    evaluate.set_defaults(func=cmd_evaluate)

    compare_cmd = command("compare", "Both models answer the same prompts: text, speed, memory, agreement.")
    compare_cmd.add_argument("run_dir")
    source = compare_cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt")
    source.add_argument("--prompts", help="a prompt file: .txt (one per line) or .jsonl (\"prompt\" per line)")
    compare_cmd.add_argument("--provider", default="auto", choices=PROVIDER_CHOICES)
    compare_cmd.add_argument("--system", help="system prompt (models with a chat template)")
    compare_cmd.add_argument("--max-new-tokens", type=int, default=128)
    compare_cmd.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    compare_cmd.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    compare_cmd.add_argument("--top-p", type=float, default=1.0)
    compare_cmd.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = none")
    compare_cmd.add_argument("--stop", nargs="*", metavar="TEXT", help="stop when the answer contains one of these")
    compare_cmd.add_argument("--seed", type=int, help="same seed, same text when sampling")
    compare_cmd.add_argument("--json-schema", metavar="FILE", help="constrain answers to JSON matching this schema")
    compare_cmd.add_argument("--speculative", action="store_true",
                             help="also run the original with INT4 drafting (greedy only): acceptance and speed-up")
    compare_cmd.add_argument("--draft-tokens", type=int, default=4, help="tokens INT4 proposes per step")
    compare_cmd.add_argument("--batch-size", type=int, default=1, help="prompts per batch (throughput; no streaming)")
    compare_cmd.add_argument("--truncate", action="store_true", help="keep the end of a prompt too long for the model")
    compare_cmd.add_argument("--out", help="write the table to FILE.csv or FILE.md")
    compare_cmd.set_defaults(func=cmd_compare)

    bench = command("bench", "Decode speed, time to first token and peak RAM of both models, alternating.")
    bench.add_argument("run_dir")
    bench.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES)
    bench.add_argument("--rounds", type=int, default=3, help="alternating measurements per model (median)")
    bench.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    bench.add_argument("--new-tokens", type=int, default=128, help="greedy tokens timed for decode speed")
    bench.add_argument("--prompt-tokens", type=int, default=256, help="prompt length timed for the first token")
    bench.set_defaults(func=cmd_bench)

    bundle = command("bundle", "Write a deployable bundle of a run's INT4 model: model, tokenizer, manifest, runner.")
    bundle.add_argument("run_dir")
    bundle.add_argument("-o", "--output", required=True, help="bundle folder to create (must not exist)")
    bundle.add_argument("--target", choices=("runner", "triton", "ray-serve"), default="runner",
                        help="runner: `python run.py` with onnxruntime; triton: a Triton Inference Server model "
                             "repository; ray-serve: the runner and a Ray Serve config (serve_config.yaml)")
    bundle.add_argument("--replicas", type=int, help="ray-serve: replicas of the server (default 1)")
    bundle.add_argument("--min-replicas", type=int, help="ray-serve: autoscale from this many replicas...")
    bundle.add_argument("--max-replicas", type=int, help="ray-serve: ...up to this many")
    bundle.add_argument("--parallel", type=int, help="ray-serve: answers decoded together in a replica (default 8)")
    bundle.add_argument("--zip", action="store_true", help="write OUTPUT.zip instead of a folder")
    bundle.add_argument("--name", help="model name (Triton's model folder); default: the source's name + -int4")
    bundle.set_defaults(func=cmd_bundle)

    verify = command("verify", "Check a bundle (folder or zip): every checksum, and the model's recorded answer.")
    verify.add_argument("bundle")
    verify.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES)
    verify.set_defaults(func=cmd_verify)

    serve = command("serve", "Serve a bundle (or a run, bundled on the fly) over the OpenAI HTTP API.")
    serve.add_argument("run_or_bundle")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (others need --api-key)")
    serve.add_argument("--port", type=int, default=8000, help="0: one the system picks")
    serve.add_argument("--api-key", help="key clients must send as 'Authorization: Bearer KEY'")
    serve.add_argument("--parallel", type=int, help="answers decoded together (default 8)")
    serve.add_argument("--provider", default="cpu", choices=PROVIDER_CHOICES)
    serve.set_defaults(func=cmd_serve)

    report = command("report", "Regenerate report.md and memory.png of a run folder.")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("onnxruntime", "optimum", "transformers", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        _clean_up_stopped(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C, or Terminated (SIGTERM)
        return _stopped()
    except Exception as error:
        if _signalled:  # the interrupted library caught the signal's exception and raised one of its own
            return _stopped()
        if isinstance(error, WorkbenchError):
            print(f"error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, JobCancelled):
            print("cancelled; nothing was written.", file=sys.stderr)
            return 130
        raise


# The stop signals received; staged folders are removed whatever exception unwinds them.
_signalled: list[int] = []


def _stop(signum: int, frame) -> None:
    _signalled.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _stopped() -> int:
    if signal.SIGTERM in _signalled:
        print("stopped (SIGTERM); nothing was written.", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("cancelled; nothing was written.", file=sys.stderr)
    return 130


def _clean_up_stopped(args: argparse.Namespace) -> None:
    """Before writing a run or converting a model: remove what stopped runs left there (see staged_dir)."""
    from workbench.partial import clean_up_stopped
    from workbench.sources import conversion_folders

    folders = [Path(args.output).absolute().parent] if getattr(args, "output", None) else []
    if getattr(args, "model", None):
        folders += conversion_folders()
    message = clean_up_stopped(folders)
    if message:
        print(message, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
