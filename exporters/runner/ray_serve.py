"""This model on Ray Serve: the bundle's OpenAI server (serve.py: the same engine, batching and routes)
in several replicas behind Ray's HTTP proxy. Ray is optional: `pip install -r requirements-ray.txt`.

On one machine (starts a local Ray, answers on http://127.0.0.1:8000/v1):
    serve run ray_serve:app replicas=2
    serve run ray_serve:app min_replicas=1 max_replicas=4      # autoscaling between bounds
    python ray_serve.py --replicas 2 --port 8000                # the same, without the `serve` command
On an existing Ray cluster (this folder at the same path on every node, e.g. a shared disk):
    python ray_serve.py --address auto --host 0.0.0.0 --api-key KEY --min-replicas 2 --max-replicas 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the runner's modules lie beside this file

import ray  # noqa: E402
import ray.serve  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import run  # noqa: E402
import serve  # noqa: E402

APP_NAME = "int4-workbench"
OPTIONS = ("replicas", "min_replicas", "max_replicas", "parallel", "queue", "threads", "max_prompt_tokens",
           "max_tokens_limit")


@ray.serve.deployment
class OpenAIServer:
    """One replica: the bundle's model and scheduler, answering the OpenAI routes through Ray's proxy."""

    def __init__(self, limits: serve.Limits, threads: int, provider: str, name: str, api_key: str | None):
        settings = json.loads((HERE / "runner.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(HERE / settings["tokenizer"]))
        model = run.load_model(settings, provider, threads, serve.SPINNING)
        self.service = serve.Service(model, tokenizer, settings, name, limits)
        self.api_key = api_key

    async def __call__(self, request: Request) -> Response:
        try:
            serve.check_key(self.api_key, request.headers.get("authorization"))
            if request.method == "GET":
                return JSONResponse(self.service.get(request.url.path))
            if request.method != "POST":
                raise serve.ServeError(405, f"{request.method} is not served; use GET or POST.")
            route = serve.post_route(request.url.path)
            data = await request.body()
            self.service.check_size(len(data))
            job, stream = self.service.job(route, serve.parse_json(data))
        except serve.ServeError as error:
            return JSONResponse(error.payload(), error.status, error.headers())
        if stream:
            return StreamingResponse(self._sse(route, job), media_type="text/event-stream")
        try:
            # Waiting happens in a thread; a client that leaves cancels this coroutine, and `finally` the job.
            return JSONResponse(await asyncio.to_thread(self.service.complete, route, job, job.follow()))
        except serve.ServeError as error:
            return JSONResponse(error.payload(), error.status, error.headers())
        finally:
            job.cancelled.set()

    def _sse(self, route: str, job: serve.Job):
        try:
            yield from self.service.sse(route, job, job.follow())
        finally:  # also when the client left and the response is dropped
            job.cancelled.set()


def build(replicas: int = 1, min_replicas: int | None = None, max_replicas: int | None = None, parallel: int = 8,
          queue: int = 32, threads: int = 1, max_prompt_tokens: int = 1024, max_tokens_limit: int = 512,
          provider: str = "cpu", name: str | None = None, api_key: str | None = None):
    """The Ray Serve application: `replicas` copies, or autoscaling between `min_replicas` and `max_replicas`."""
    limits = serve.Limits(rows=parallel, queue=queue, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens_limit)
    if min_replicas is not None or max_replicas is not None:
        low, high = min_replicas or 1, max_replicas or max(min_replicas or 1, replicas)
        if not 1 <= low <= high:
            raise ValueError(f"Autoscaling needs 1 <= min_replicas <= max_replicas, not {low} and {high}.")
        # A replica counts as fully used when all its rows are busy.
        scale = {"autoscaling_config": {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": parallel}}
    else:
        scale = {"num_replicas": replicas}
    deployment = OpenAIServer.options(
        **scale,
        max_ongoing_requests=parallel + queue,  # beyond this Ray holds requests at the proxy...
        max_queued_requests=parallel + queue,  # ...and beyond that answers 503
        # The replicas import the runner's modules from this folder.
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"PYTHONPATH": str(HERE)}}},
    )
    return deployment.bind(limits, threads, provider, name or HERE.name, api_key)


def app(args: dict[str, str]):
    """For `serve run ray_serve:app replicas=2 ...` (numbers as key=value; see OPTIONS)."""
    unknown = sorted(set(args) - set(OPTIONS) - {"provider", "name"})
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}, provider, name.")
    numbers = {key: int(value) for key, value in args.items() if key in OPTIONS}
    return build(**numbers, **{key: args[key] for key in ("provider", "name") if key in args},
                 api_key=serve.checked_key("127.0.0.1", None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve this model on Ray Serve (OpenAI HTTP API).")
    parser.add_argument("--address", help="an existing Ray cluster (`auto` from one of its nodes); default: a local Ray")
    parser.add_argument("--host", default="127.0.0.1", help="the proxy's address (others need an API key)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help=f"key clients send as 'Authorization: Bearer KEY' (or ${serve.API_KEY_ENV})")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--min-replicas", type=int, help="autoscale from this many replicas...")
    parser.add_argument("--max-replicas", type=int, help="...up to this many")
    parser.add_argument("--parallel", type=int, default=8, help="answers decoded together in a replica")
    parser.add_argument("--queue", type=int, default=32, help="requests that may wait in a replica")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (and Ray CPUs) of a replica")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    key = serve.checked_key(args.host, args.api_key)
    if args.address:
        ray.init(address=args.address)
    else:  # a private cluster on this machine, gone when this process ends
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    ray.serve.start(http_options={"host": args.host, "port": args.port})
    application = build(args.replicas, args.min_replicas, args.max_replicas, args.parallel, args.queue, args.threads,
                        provider=args.provider, api_key=key)
    ray.serve.run(application, name=APP_NAME, route_prefix="/")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {HERE.name} at http://{shown}:{args.port}/v1 (OpenAI API, Ray Serve); Ctrl-C stops.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray.serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
