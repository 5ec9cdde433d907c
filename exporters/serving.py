"""Serving a bundle: its OpenAI server started as a process (`run.py --serve`), for the CLI and the app,
the Ray Serve extra's requirements, and the model card's words on serving.

The server itself lives in the bundle (exporters/runner/serve.py, ray_serve.py): it must run where
the workbench is not installed, so it cannot import from here, nor this from it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.jobs import Cancelled, Progress, check, never_cancelled, no_progress

log = logging.getLogger(__name__)
RAY_REQUIREMENTS_FILE = "requirements-ray.txt"
RAY_PACKAGE = "ray[serve]"
RAY_CONFIG_FILE = "serve_config.yaml"  # the ray-serve target's Ray Serve config (`serve run serve_config.yaml`)
RAY_APP = "int4-workbench"  # the application's name in Ray Serve (ray_serve.APP_NAME)
API_KEY_ENV = "INT4_SERVE_API_KEY"  # serve.py's name for it (the bundle cannot import the workbench)
READY = "Serving "  # the line serve.py prints once it listens
POLL_S = 0.2  # how often the wait for that line looks whether it was cancelled


@dataclass
class LocalServer:
    """A bundle's server process and where it answers."""

    process: subprocess.Popen
    url: str  # http://HOST:PORT/v1
    model: str
    api_key: str | None = None

    def curl(self) -> str:
        """A ready command line that asks the server one question."""
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": "Hello!"}]})
        auth = f" -H {shlex.quote('Authorization: Bearer ' + self.api_key)}" if self.api_key else ""
        return (f"curl {self.url}/chat/completions -H 'Content-Type: application/json'{auth} "
                f"-d {shlex.quote(body)}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def is_bundle(path: Path) -> bool:
    return (path / "run.py").is_file() and (path / "serve.py").is_file() and (path / "runner.json").is_file()


def start_server(bundle: Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 parallel: int | None = None, provider: str = "cpu", progress: Progress = no_progress,
                 cancelled: Cancelled = never_cancelled) -> LocalServer:
    """Start `run.py --serve` of `bundle` and wait until it listens (port 0: one the system picks).

    No time limit: the server prints its line right after it listens, and exits with its reason when it cannot
    start, so while it runs it is loading the model, which on a busy machine can take minutes for a large one.
    Cancelling (the app's button, Ctrl-C on the command line) stops it.
    """
    bundle = Path(bundle)
    progress(0.0, "starting the server")
    if not is_bundle(bundle):
        raise WorkbenchError(f"{bundle} is not a runner bundle with a server (run.py, serve.py, runner.json). "
                             "Make one with `int4-workbench bundle RUN -o FOLDER`.")
    command = [sys.executable, "run.py", "--serve", "--host", host, "--port", str(port), "--provider", provider]
    if parallel is not None:
        command += ["--parallel", str(parallel)]
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if api_key:
        env[API_KEY_ENV] = api_key  # not on the command line, where other users could read it
    errors = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(command, cwd=bundle, env=env, stdout=subprocess.PIPE, stderr=errors, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(process.stdout.readline()), daemon=True).start()
    line = ""
    while not line:
        try:
            line = lines.get(timeout=POLL_S) or "(it ended)"
        except queue.Empty:
            pass
        if cancelled():
            process.kill()
            process.wait()
            check(cancelled)
    if READY not in line:
        if process.poll() is None:
            process.kill()
        process.wait()
        errors.seek(0)
        reason = errors.read().strip().splitlines()
        raise WorkbenchError(f"The server of {bundle} did not start: {reason[-1] if reason else 'no reason given'}")
    url = line.split(" at ", 1)[1].split(" ", 1)[0]
    model = line[len(READY):].split(" at ", 1)[0]
    log.info("serving %s at %s", bundle, url)
    progress(1.0, f"serving at {url}")
    return LocalServer(process, url, model, api_key)


@dataclass(frozen=True)
class RayScale:
    """How many replicas the ray-serve target's application runs: `replicas`, or autoscaling between bounds."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    parallel: int = 8  # answers decoded together in one replica

    def app_args(self) -> dict[str, int]:
        """ray_serve.app's arguments; raises WorkbenchError with what to change."""
        if self.replicas < 1 or self.parallel < 1:
            raise WorkbenchError(f"Replicas and --parallel must be at least 1, not {self.replicas} and {self.parallel}.")
        if self.min_replicas is None and self.max_replicas is None:
            return {"replicas": self.replicas, "parallel": self.parallel}
        low = self.min_replicas or 1
        high = self.max_replicas or max(low, self.replicas)
        if not 1 <= low <= high:
            raise WorkbenchError(f"Autoscaling needs 1 <= --min-replicas <= --max-replicas, not {low} and {high}.")
        return {"min_replicas": low, "max_replicas": high, "parallel": self.parallel}


def ray_serve_config(scale: RayScale, port: int = 8000) -> str:
    """serve_config.yaml: Ray Serve's own config file for the bundle's application (ray_serve:app)."""
    args = "".join(f"    {key}: {value}\n" for key, value in scale.app_args().items())
    return (
        "# Ray Serve config of this bundle's OpenAI server (ray_serve.py). In this folder:\n"
        f"#   serve run {RAY_CONFIG_FILE}                      # this machine: starts a local Ray\n"
        f"#   serve run {RAY_CONFIG_FILE} --address auto       # on a node of an existing Ray cluster\n"
        "# `args` are ray_serve.app's: replicas, or min_replicas and max_replicas (autoscaling), parallel, queue,\n"
        "# threads, max_prompt_tokens, max_tokens_limit. A host other than 127.0.0.1 needs $INT4_SERVE_API_KEY set.\n"
        "proxy_location: HeadOnly\n"
        "http_options:\n"
        "  host: 127.0.0.1\n"
        f"  port: {port}\n"
        "applications:\n"
        f"- name: {RAY_APP}\n"
        "  route_prefix: /\n"
        "  import_path: ray_serve:app\n"
        "  args:\n"
        f"{args}"
    )


def ray_requirements() -> str:
    """requirements-ray.txt: the Ray Serve version the app was checked with, if installed here."""
    import importlib.metadata

    try:
        version = f"=={importlib.metadata.version('ray')}"
    except importlib.metadata.PackageNotFoundError:
        version = ""
    return (
        "# Only for ray_serve.py (the model on Ray Serve), on top of requirements.txt.\n"
        f"{RAY_PACKAGE}{version}\n"
    )


def card_section(target: str) -> list[str]:
    """The model card's lines on serving the model to other programs."""
    if target == "ray-serve":
        return [
            "",
            "## Serve it on Ray Serve",
            "",
            f"{RAY_CONFIG_FILE} is a Ray Serve config: this bundle's OpenAI server (ray_serve.py, the same engine "
            "and continuous batching as `python run.py --serve`) in replicas behind Ray's HTTP proxy, with the "
            "replicas or autoscaling bounds given when the bundle was made (its `args`; edit them there).",
            "",
            "On a laptop, in this folder (starts a local Ray; answers on http://127.0.0.1:8000/v1):",
            "",
            "```",
            f"pip install -r requirements.txt -r {RAY_REQUIREMENTS_FILE}",
            f"serve run {RAY_CONFIG_FILE}",
            "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
            "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
            "```",
            "",
            "On an existing Ray cluster: put this folder at the same path on every node (a shared disk, or a copy), "
            f"install both requirement files there, and on a node of the cluster run `serve run {RAY_CONFIG_FILE} "
            "--address auto` in this folder (`--non-blocking` returns once it is deployed). The proxy listens on "
            "127.0.0.1 unless `http_options.host` says otherwise; before opening it to other machines set "
            f"${API_KEY_ENV} where the application is built (the shell of `serve run` for a local Ray; on a cluster, "
            "the nodes' environment before `ray start`): every request must then send `Authorization: Bearer KEY`. "
            "Ray is needed only for this: `python run.py` and `python run.py --serve` run without it.",
        ] + card_section("runner")
    if target == "triton":
        return [
            "",
            "## What a Triton client must do",
            "",
            "Triton's onnxruntime backend runs one forward pass per request; it cannot run the generation loop. "
            "The client runs it: tokenize the prompt (tokenizer.json, the chat format in runner.json), send it "
            "with an empty cache, take the most likely token from the last row of `logits`, then send that one "
            "token with the `present.N.key/value` outputs as the next `past_key_values.N.key/value`, the "
            "attention mask one longer and the next position, and repeat until an end-of-sequence id "
            "(runner.json) or the length you want; then detokenize. Every step ships the whole cache both ways.",
            "",
            "The ready-made way to serve this model is the runner bundle (`int4-workbench bundle RUN -o OUT`): "
            "`python run.py --serve` speaks the OpenAI HTTP API with streaming and batches concurrent requests, "
            "and `ray_serve.py` runs it in several replicas on Ray Serve.",
        ]
    return [
        "",
        "## Serve it",
        "",
        "```",
        "python run.py --serve               # OpenAI HTTP API on http://127.0.0.1:8000/v1",
        "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\",
        "    -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
        "```",
        "",
        "Routes: `/v1/chat/completions` and `/v1/completions` (`\"stream\": true` streams server-sent events), "
        "`/v1/models`, `/health`; any OpenAI client works with `base_url=\"http://127.0.0.1:8000/v1\"`. "
        "Concurrent requests are decoded together (`--parallel`, default 8); more wait in a queue (`--queue`, "
        "default 32), and beyond it the server answers 503 with Retry-After. It listens on 127.0.0.1 only; "
        f"`--host 0.0.0.0` also needs `--api-key KEY` (or ${API_KEY_ENV}), which every request must then send "
        "as `Authorization: Bearer KEY`.",
        "",
        "Each request gets `run.py`'s greedy text, batched with others or not: every answer in the batch is "
        "computed at its own positions (its logits were equal to the bit in INT4 Workbench's tests on x86 CPUs; "
        "another CPU's kernels could round a batched row differently, and `--parallel 1` still gives `run.py`'s "
        "text then).",
        "",
        "### More replicas: Ray Serve",
        "",
        "```",
        f"pip install -r requirements.txt -r {RAY_REQUIREMENTS_FILE}",
        "serve run ray_serve:app replicas=2                     # this machine: a local Ray, port 8000",
        "serve run ray_serve:app min_replicas=1 max_replicas=4  # autoscaling between bounds",
        "python ray_serve.py --address auto --host 0.0.0.0 --api-key KEY --min-replicas 2 --max-replicas 8",
        "```",
        "",
        "The last line joins an existing Ray cluster (run it on one of its nodes, with this folder at the same "
        "path on every node, e.g. a shared disk); Ray's HTTP proxy then answers the same OpenAI routes and "
        "spreads requests over the replicas, each running the same server as `run.py --serve`.",
    ]
