"""This model behind an OpenAI-compatible HTTP API: `python run.py --serve` (`--help` lists the options).

Routes: POST /v1/chat/completions and /v1/completions (`"stream": true` answers with server-sent
events), GET /v1/models, GET /health. One scheduler thread decodes every admitted request together
in one ONNX Runtime session (engine.Batch: a request joins and leaves the batch between steps);
requests that cannot join yet wait in a bounded queue, and a full queue answers 503 with
Retry-After. A client that disconnects cancels its generation.

Only the standard library (http.server) besides the runner's own packages: the bundle's
requirements stay onnxruntime, tokenizers and numpy, and nothing else needs keeping up to date.
The server listens on 127.0.0.1 unless told otherwise; any other address needs an API key, which
is then checked on every request. No request parameter names a file.
"""

from __future__ import annotations

import argparse
import collections
import hmac
import ipaddress
import json
import logging
import os
import queue
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

import engine
from chat_format import ChatFormatError, encode

log = logging.getLogger(__name__)
API_KEY_ENV = "INT4_SERVE_API_KEY"
OWNER = "int4-workbench"
RETRY_AFTER_S = 1
GATHER_S = 0.05  # an empty batch waits this long for requests arriving together, to start them in one pass
POLL_S = 0.25  # how often a waiting handler looks whether its client is still there
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
MAX_STOP_STRINGS = 4
POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
# ONNX Runtime's threads sleep between parallel work: the scheduler's sampling and the handlers' writes need
# the cores between steps. On the demo model on 2 busy cores, 12-step runs alternated with and without
# spinning: 1 row 28-43 vs 18-22 tokens/s, 8 rows 93-96 vs 59-71.
SPINNING = False


class ServeError(Exception):
    """A request the server answers with an error status; the message says what to change."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def payload(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.status}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def post_route(path: str) -> str:
    if path not in POST_ROUTES:
        raise ServeError(404, f"No route {path}; POST to /v1/chat/completions or /v1/completions.")
    return POST_ROUTES[path]


def check_key(key: str | None, authorization: str | None) -> None:
    """Raises 401 unless `authorization` (the header) carries `key`; nothing to check without a key."""
    if key is not None and not hmac.compare_digest((authorization or "").encode(), f"Bearer {key}".encode()):
        raise ServeError(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY'.")


def parse_json(data: bytes) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServeError(400, f"The request body is not valid JSON ({error}).") from error


@dataclass(frozen=True)
class Limits:
    rows: int = 8  # requests decoded together
    queue: int = 32  # requests waiting for a row; one more gets 503
    max_prompt_tokens: int = 1024
    max_tokens: int = 512  # the most one answer may ask for (and what it gets when it asks nothing)
    max_body_bytes: int = 1 << 20


# -- the scheduler ------------------------------------------------------------------------------------


@dataclass
class Job:
    """One request inside the server: its prompt, settings, and the events its handler reads."""

    prompt: list[int]
    config: engine.GenerationConfig
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    # Events: ("piece", text), ("end", finish reason, completion tokens), ("error", status, message)

    def stream_piece(self, _token: int, piece: str) -> None:
        if piece:
            self.events.put(("piece", piece))

    def follow(self, gone: Callable[[], bool] | None = None) -> Iterator[tuple]:
        """Its events up to the last; `gone()` is asked while waiting, and True (the client left) cancels it."""
        while True:
            try:
                event = self.events.get(timeout=POLL_S)
            except queue.Empty:
                if gone is not None and gone():
                    self.cancelled.set()
                    raise ConnectionAbortedError("the client disconnected") from None
                continue
            yield event
            if event[0] != "piece":
                return


class Scheduler:
    """One thread decoding all admitted jobs together; the queue in front of it is bounded."""

    def __init__(self, model: engine.CausalLM, tokenizer, eos_token_ids, limits: Limits):
        self.model, self.tokenizer, self.eos, self.limits = model, tokenizer, list(eos_token_ids), limits
        context = model.context_length or limits.max_prompt_tokens + limits.max_tokens
        self.capacity = min(context, limits.max_prompt_tokens + limits.max_tokens)
        self.batch = engine.Batch(model, limits.rows, self.capacity)
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: dict[int, tuple[Job, engine.Sampler, engine.Answer]] = {}  # by row
        self._joining: list[Job] = []  # taken from the queue, not yet active
        self.counts = {"served": 0, "cancelled": 0, "failed": 0, "rejected": 0, "peak_active": 0}
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            # Rows that are free take new requests at once; beyond them `queue` requests may wait.
            taken = len(self.active) + len(self.waiting) + len(self._joining)
            if taken >= self.limits.rows + self.limits.queue:
                self.counts["rejected"] += 1
                raise ServeError(503, f"The server is busy ({len(self.active)} answering, {len(self.waiting)} "
                                      "waiting). Retry shortly.", retry_after=RETRY_AFTER_S)
            self.waiting.append(job)
            self._wake.notify()

    def status(self) -> dict:
        with self._wake:
            return {"active": len(self.active), "waiting": len(self.waiting), "rows": self.limits.rows,
                    "queue": self.limits.queue, **self.counts}

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self.waiting and not self.active:
                    self._wake.wait()
                gathered = time.monotonic() + GATHER_S
                while not self.active and len(self.waiting) < self.limits.rows and time.monotonic() < gathered:
                    self._wake.wait(max(gathered - time.monotonic(), 0))
            try:
                self._admit()
                if self.active:
                    self._step()
            except Exception as error:  # the server outlives a failed step; its requests get 500
                log.exception("decode step failed")
                with self._wake:
                    failed = [job for job, _, _ in self.active.values()] + self._joining
                    for job in failed:
                        job.events.put(("error", 500, f"Generation failed: {error}"))
                    self.counts["failed"] += len(failed)
                    self.active.clear()
                    self._joining = []
                    self.batch = engine.Batch(self.model, self.limits.rows, self.capacity)

    def _admit(self) -> None:
        """Join waiting jobs in order while they fit; the first that does not fit waits for rows to free."""
        with self._wake:
            while self.waiting and self.waiting[0].cancelled.is_set():
                self._end(self.waiting.popleft(), "cancelled", 0)
            group: list[Job] = []
            for job in self.waiting:
                if job.cancelled.is_set() or not self.batch.fit_together(
                        [(len(j.prompt), j.config.max_new_tokens) for j in [*group, job]]):
                    break
                group.append(job)
            for _ in group:
                self.waiting.popleft()
            self._joining = group
        if not group:
            return
        joined = self.batch.join([job.prompt for job in group])
        with self._wake:
            for job, (row, _) in zip(group, joined):
                answer = engine.Answer(len(job.prompt), job.config, self.model.context_length, self.tokenizer,
                                       self.eos, job.stream_piece, job.cancelled.is_set)
                self.active[row] = (job, engine.Sampler(job.config), answer)
            self._joining = []
            self.counts["peak_active"] = max(self.counts["peak_active"], len(self.active))
        for row, logits in joined:
            self._take(row, logits)

    def _step(self) -> None:
        feed = {row: answer.tokens[-1] for row, (_, _, answer) in self.active.items()}
        for row, logits in self.batch.step(feed).items():
            self._take(row, logits)

    def _take(self, row: int, logits: np.ndarray) -> None:
        job, sampler, answer = self.active[row]
        if answer.add(sampler(logits, job.prompt + answer.tokens)):
            del self.active[row]
            self.batch.leave(row)
            self._end(job, answer.finish, len(answer.tokens))

    def _end(self, job: Job, finish: str, tokens: int) -> None:
        self.counts["cancelled" if finish == "cancelled" else "served"] += 1
        job.events.put(("end", finish, tokens))


# -- requests and answers -----------------------------------------------------------------------------


class Service:
    """The OpenAI routes over one scheduler; shared by the HTTP server here and the Ray Serve app."""

    def __init__(self, model: engine.CausalLM, tokenizer, settings: dict, name: str, limits: Limits = Limits()):
        self.tokenizer, self.settings, self.name, self.limits = tokenizer, settings, name, limits
        self.scheduler = Scheduler(model, tokenizer, settings["eos_token_ids"], limits)
        self.max_prompt = min(limits.max_prompt_tokens, self.scheduler.capacity - 1)
        self.scheduler.start()

    def check_size(self, length: int) -> None:
        if length > self.limits.max_body_bytes:
            raise ServeError(413, f"The request body has {length} bytes; this server takes at most "
                                  f"{self.limits.max_body_bytes}.")

    def get(self, path: str) -> dict:
        """The GET routes: /health (this process's counts) and /v1/models."""
        if path == "/health":
            return {"status": "ok", "model": self.name, "pid": os.getpid(), **self.scheduler.status()}
        if path == "/v1/models":
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": OWNER}]}
        raise ServeError(404, f"No route {path}; use /v1/chat/completions, /v1/completions, /v1/models or /health.")

    def job(self, route: str, body: dict) -> tuple[Job, bool]:
        """Check a request body and queue its job; (job, whether it streams). Raises ServeError."""
        if not isinstance(body, dict):
            raise ServeError(400, "The request body must be a JSON object.")
        chat = route == "chat"
        stream = _typed(body, "stream", bool, False)
        _typed(body, "model", str, None)
        if _typed(body, "n", int, 1) != 1:
            raise ServeError(400, "n must be 1: this server gives one answer per request.")
        try:
            ids = encode(self.tokenizer, self.settings["chat"], _messages(body)) if chat else self._plain(body)
        except ChatFormatError as error:
            raise ServeError(400, str(error)) from error
        if not ids:
            raise ServeError(400, "The prompt is empty.")
        if len(ids) > self.max_prompt:
            raise ServeError(400, f"The prompt has {len(ids)} tokens; this server takes at most {self.max_prompt}. "
                                  "Shorten it.")
        room = min(self.limits.max_tokens, self.scheduler.capacity - len(ids))
        asked = _typed(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens",
                       int, None)
        if asked is not None and not 1 <= asked <= room:
            raise ServeError(400, f"max_tokens must be between 1 and {room} for this prompt of {len(ids)} tokens, "
                                  f"not {asked}.")
        stop = _typed(body, "stop", (str, list), [])
        stop = [stop] if isinstance(stop, str) else stop
        if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
            raise ServeError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings.")
        try:
            config = engine.GenerationConfig(
                max_new_tokens=asked or room, temperature=float(_typed(body, "temperature", (int, float), 0.0)),
                top_p=float(_typed(body, "top_p", (int, float), 1.0)), stop=tuple(stop),
                seed=_typed(body, "seed", int, None),
            )
        except engine.GenerationError as error:
            raise ServeError(400, str(error)) from error
        options = _typed(body, "stream_options", dict, {})
        job = Job(ids, config, include_usage=_typed(options, "include_usage", bool, False))
        self.scheduler.submit(job)
        return job, stream

    def _plain(self, body: dict) -> list[int]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ServeError(400, "prompt must be a string (or a list of one string).")
        return self.tokenizer.encode(prompt, add_special_tokens=True).ids

    def complete(self, route: str, job: Job, events: Iterable[tuple]) -> dict:
        """The whole answer from the job's events; an error event raises ServeError."""
        pieces = []
        for event in events:
            if event[0] == "error":
                raise ServeError(event[1], event[2])
            if event[0] == "piece":
                pieces.append(event[1])
                continue
            text, finish, tokens = "".join(pieces), event[1], event[2]
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if route == "chat"
                      else {"index": 0, "text": text, "logprobs": None})
            return {**self._head(route, job, chunk=False), "choices": [{**choice, "finish_reason": FINISH[finish]}],
                    "usage": _usage(job, tokens)}
        raise ServeError(500, "The answer ended without finishing.")

    def sse(self, route: str, job: Job, events: Iterable[tuple]) -> Iterator[bytes]:
        """The answer as server-sent events, ending with [DONE]; an error travels as an event (the status is sent)."""
        if route == "chat":
            yield _event(self.chunk(route, job, None, first=True))
        for event in events:
            if event[0] == "piece":
                yield _event(self.chunk(route, job, event[1]))
            elif event[0] == "end":
                yield _event(self.chunk(route, job, None, finish=event[1]))
                if job.include_usage:
                    yield _event({**self._head(route, job, chunk=True), "choices": [], "usage": _usage(job, event[2])})
            else:
                yield _event({"error": {"message": event[2], "type": "server_error", "code": event[1]}})
        yield b"data: [DONE]\n\n"

    def chunk(self, route: str, job: Job, piece: str | None, finish: str | None = None, first: bool = False) -> dict:
        if route == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None}
        return {**self._head(route, job, chunk=True),
                "choices": [{**choice, "finish_reason": FINISH[finish] if finish else None}]}

    def _head(self, route: str, job: Job, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if route == "chat" else "text_completion"
        prefix = "chatcmpl" if route == "chat" else "cmpl"
        return {"id": f"{prefix}-{job.id}", "object": kind, "created": job.created, "model": self.name}


def _typed(body: dict, key: str, kinds, default):
    value = body.get(key)
    if value is None:
        return default
    # JSON's true/false are Python ints too; a number field must not take them.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise ServeError(400, f"{key} must be of type {names.replace('str', 'string').replace('int', 'integer')}.")
    return value


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects.")
    plain = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ServeError(400, "Each message needs a role of system, user or assistant.")
        content = message.get("content")
        if isinstance(content, list):  # the parts form: only text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ServeError(400, "Message content parts must all be text parts.")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ServeError(400, "Each message's content must be a string.")
        plain.append({"role": message["role"], "content": content})
    return plain


def _event(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _usage(job: Job, tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt), "completion_tokens": tokens, "total_tokens": len(job.prompt) + tokens}


# -- HTTP ---------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # a garbled request line is still answered with a status line
    server: Server

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a garbled request, an unknown method), as JSON like the rest."""
        self.close_connection = True
        self._error(ServeError(code, message or HTTPStatus(code).phrase))

    def do_GET(self) -> None:
        self._serve(lambda: self._get())

    def do_POST(self) -> None:
        self._serve(lambda: self._post())

    def _get(self) -> None:
        self._json(200, self.server.service.get(self.path.split("?", 1)[0]))

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        route = post_route(path)
        body = self._body()
        job, stream = self.server.service.job(route, body)
        try:
            (self._stream if stream else self._whole)(route, job)
        finally:
            job.cancelled.set()  # done, or the client left: either way the scheduler may drop it

    def _body(self) -> dict:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") or length is None or not length.isdigit():
            self.close_connection = True
            raise ServeError(411, "Send the JSON body with a Content-Length header.")
        self.close_connection = True  # until the body was read: an oversized one never is
        self.server.service.check_size(int(length))
        body = parse_json(self.rfile.read(int(length)))
        self.close_connection = False
        return body

    def _whole(self, route: str, job: Job) -> None:
        self._json(200, self.server.service.complete(route, job, job.follow(self._client_left)))

    def _stream(self, route: str, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for data in self.server.service.sse(route, job, job.follow(self._client_left)):
                self._chunk(data)
            self._chunk(b"")
        except OSError:  # the client left; _post's finally cancels the job
            self.close_connection = True

    def _client_left(self) -> bool:
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _serve(self, route) -> None:
        """Run a route; every failure becomes a JSON error answer, never the server's end."""
        try:
            self._check_key()
            route()
        except ServeError as error:
            self._error(error)
        except OSError:  # the client left
            self.close_connection = True
        except Exception as error:  # a bug in a route answers 500 and leaves the server serving
            log.exception("request failed")
            self._error(ServeError(500, f"Internal error: {error}"))

    def _check_key(self) -> None:
        try:
            check_key(self.server.api_key, self.headers.get("Authorization"))
        except ServeError:
            self.close_connection = True
            raise

    def _error(self, error: ServeError) -> None:
        try:
            self._json(error.status, error.payload(), error.headers())
        except OSError:
            self.close_connection = True

    def _json(self, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # Connections not yet accepted. The default, 5, overflowed in a soak of 16 clients on a busy machine, and
    # the kernel reset a connection it had accepted with a SYN cookie; requests are bounded by the queue.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], service: Service, api_key: str | None):
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)
        self.service, self.api_key = service, api_key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (--serve)")
    group.add_argument("--serve", action="store_true", help="serve the OpenAI HTTP API instead of chatting")
    group.add_argument("--host", default="127.0.0.1",
                       help=f"address to listen on (default 127.0.0.1; any other needs --api-key or ${API_KEY_ENV})")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", help=f"key clients send as 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    group.add_argument("--model-name", help="the model's name in the API (default: this folder's name)")
    defaults = Limits()
    group.add_argument("--parallel", type=int, default=defaults.rows, help="answers decoded together")
    group.add_argument("--queue", type=int, default=defaults.queue, help="requests that may wait; more get 503")
    group.add_argument("--max-prompt-tokens", type=int, default=defaults.max_prompt_tokens)
    group.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens,
                       help="the most tokens one answer may ask for (also the default)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checked_key(host: str, api_key: str | None) -> str | None:
    """The API key to require; refuses a non-loopback address without one (SystemExit with the reason)."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    if key is None and not is_loopback(host):
        raise SystemExit(f"error: listening on {host} lets other machines in; give an API key with --api-key or "
                         f"${API_KEY_ENV}, or listen on 127.0.0.1.")
    return key


def limits_of(args: argparse.Namespace) -> Limits:
    values = {"--parallel": args.parallel, "--max-prompt-tokens": args.max_prompt_tokens,
              "--max-tokens-limit": args.max_tokens_limit}
    for flag, value in values.items():
        if value < 1:
            raise SystemExit(f"error: {flag} must be at least 1, not {value}.")
    if args.queue < 0:
        raise SystemExit(f"error: --queue must be 0 or more, not {args.queue}.")
    return Limits(rows=args.parallel, queue=args.queue, max_prompt_tokens=args.max_prompt_tokens,
                  max_tokens=args.max_tokens_limit)


def serve(args: argparse.Namespace, load: Callable[[], engine.CausalLM], tokenizer, settings: dict, name: str) -> int:
    """Serve until Ctrl-C; `load` gives the model once the address and limits were checked."""
    key, limits = checked_key(args.host, args.api_key), limits_of(args)
    service = Service(load(), tokenizer, settings, args.model_name or name, limits)
    server = Server((args.host, args.port), service, key)
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in host else host
    # The one line a supervisor (or the workbench) waits for.
    print(f"Serving {service.name} at http://{shown}:{port}/v1 (OpenAI API); Ctrl-C stops.", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
