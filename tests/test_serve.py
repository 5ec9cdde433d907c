"""The bundle's OpenAI-compatible server (`run.py --serve`): a real server process on a loopback port,
driven over real HTTP, its answers compared with the runner's greedy text."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from exporters.bundle import build_bundle
from serve_helpers import PROMPTS, chat, greedy_text

API_KEY_ENV = "INT4_SERVE_API_KEY"  # documented in serve.py and the model card


class Server:
    """`python run.py --serve` in the bundle, on a port the system picks (--port 0)."""

    def __init__(self, bundle: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "run.py", "--serve", "--port", "0", "--provider", "cpu", *args], cwd=bundle,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.process.stdout.readline()  # blocks until the server says where it listens, or dies
        if "http://" not in line:
            self.process.kill()
            raise AssertionError(f"the server did not start: {line}{self.process.stderr.read()}")
        address = line.split("http://", 1)[1].split("/", 1)[0]
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response, connection

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        response, connection = self.request("POST", path, body, headers)
        payload = json.loads(response.read())
        connection.close()
        return response.status, dict(response.getheaders()), payload

    def stream(self, path: str, body: dict) -> tuple[str, list[dict]]:
        """The streamed text and the events, read until [DONE]."""
        response, connection = self.request("POST", path, {**body, "stream": True})
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        events = []
        for line in response:
            line = line.decode().strip()
            if line == "data: [DONE]":
                break
            if line:
                assert line.startswith("data: ")
                events.append(json.loads(line[len("data: "):]))
        connection.close()
        pieces = [c.get("delta", {}).get("content") or c.get("text") or "" for e in events for c in e["choices"]]
        return "".join(pieces), events

    def health(self) -> dict:
        response, connection = self.request("GET", "/health")
        payload = json.loads(response.read())
        connection.close()
        return payload

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture
def start(bundle):
    servers = []

    def started(*args: str) -> Server:
        servers.append(Server(bundle, *args))
        return servers[-1]

    yield started
    for server in servers:
        server.stop()


def runner_text(bundle: Path, prompt: str, tokens: int, *flags: str) -> str:
    result = subprocess.run([sys.executable, "run.py", "--prompt", prompt, "--max-new-tokens", str(tokens),
                             "--provider", "cpu", *flags], cwd=bundle, capture_output=True, text=True, timeout=120,
                            check=True)
    return result.stdout[:-1]  # the runner ends its answer with a newline


def test_answers_equal_the_runner_greedy_text(bundle, start):
    server = start()
    expected_chat = runner_text(bundle, PROMPTS[0], 24)
    expected_plain = runner_text(bundle, PROMPTS[0], 24, "--no-chat")
    status, _, answer = server.post("/v1/chat/completions", chat(PROMPTS[0], 24))
    assert status == 200 and answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": expected_chat}
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 24
    text, events = server.stream("/v1/chat/completions", {**chat(PROMPTS[0], 24),
                                                          "stream_options": {"include_usage": True}})
    assert text == expected_chat and events[-1]["usage"]["completion_tokens"] == 24 and not events[-1]["choices"]
    events.pop()
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1]["choices"][0]["finish_reason"] == "length"
    status, _, answer = server.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 24})
    assert status == 200 and answer["choices"][0]["text"] == expected_plain
    assert server.stream("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 24})[0] == expected_plain
    response, connection = server.request("GET", "/v1/models")
    assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny"]
    connection.close()


def test_eight_concurrent_clients_get_complete_correct_answers(bundle, start):
    server = start("--parallel", "8")
    lengths = [40 + 9 * i for i in range(8)]
    expected = [greedy_text(bundle, p, n) for p, n in zip(PROMPTS, lengths)]
    results: dict[int, str] = {}
    gate = threading.Barrier(8)

    def client(i: int) -> None:
        gate.wait()
        if i % 2:
            results[i] = server.stream("/v1/chat/completions", chat(PROMPTS[i], lengths[i]))[0]
        else:
            status, _, answer = server.post("/v1/chat/completions", chat(PROMPTS[i], lengths[i]))
            results[i] = answer["choices"][0]["message"]["content"] if status == 200 else f"status {status}"

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results.get(i) for i in range(8)] == expected
    health = server.health()
    assert health["served"] == 8 and health["active"] == 0
    assert health["peak_active"] > 1  # they were decoded together, not one after another


def test_a_full_queue_answers_503_with_retry_after(bundle, start):
    server = start("--parallel", "1", "--queue", "0")
    expected = greedy_text(bundle, PROMPTS[1], 200)
    answers = []
    gate = threading.Barrier(6)

    def client() -> None:
        gate.wait()
        try:
            answers.append(server.post("/v1/chat/completions", chat(PROMPTS[1], 200)))
        except Exception as error:
            answers.append((repr(error), {}, {}))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    busy = [a for a in answers if a[0] == 503]
    served = [a for a in answers if a[0] == 200]
    assert busy and served and len(busy) + len(served) == 6, [a[0] for a in answers]
    assert all(a[1]["Retry-After"] == "1" and "busy" in a[2]["error"]["message"] for a in busy)
    assert all(a[2]["choices"][0]["message"]["content"] == expected for a in served)
    # The retry a 503 asks for succeeds once the row is free.
    status, _, answer = server.post("/v1/chat/completions", chat(PROMPTS[1], 200))
    assert status == 200 and answer["choices"][0]["message"]["content"] == expected
    assert server.health()["rejected"] == len(busy)


def test_a_client_that_disconnects_is_cancelled_and_frees_its_place(bundle, start):
    """A streaming client that leaves at once, while another answer holds the only row: it is cancelled."""
    server = start("--parallel", "1", "--queue", "1")
    holder = threading.Thread(target=lambda: server.post("/v1/chat/completions", chat(PROMPTS[1], 200)))
    holder.start()
    deadline = time.monotonic() + 10
    while not server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.005)
    body = json.dumps({**chat(PROMPTS[0], 100), "stream": True}).encode()
    with socket.create_connection((server.host, server.port), timeout=30) as client:
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    holder.join(timeout=60)
    deadline = time.monotonic() + 10
    while (health := server.health())["cancelled"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["cancelled"] == 1 and health["served"] == 1 and health["active"] == health["waiting"] == 0
    # Its place is free again: the next client is answered.
    status, _, answer = server.post("/v1/chat/completions", chat(PROMPTS[1], 8))
    assert status == 200 and answer["choices"][0]["message"]["content"] == greedy_text(bundle, PROMPTS[1], 8)


@pytest.mark.parametrize(("body", "status", "says"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": "hello"}).encode(), 400, "messages must be"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "content must be a string"),
    (json.dumps({**chat("Hi", 8), "max_tokens": "eight"}).encode(), 400, "max_tokens must be of type integer"),
    (json.dumps({**chat("Hi", 8), "max_tokens": True}).encode(), 400, "max_tokens must be of type integer"),
    (json.dumps({**chat("Hi", 8), "max_tokens": 100000}).encode(), 400, "max_tokens must be between 1 and"),
    (json.dumps({**chat("Hi", 8), "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({**chat("Hi", 8), "stream": "yes"}).encode(), 400, "stream must be of type bool"),
    (json.dumps({**chat("Hi", 8), "stop": [""]}).encode(), 400, "stop must be"),
    (json.dumps(chat("fox " * 400, 8)).encode(), 400, "this server takes at most"),
    (json.dumps({**chat("Hi", 8), "messages": [{"role": "assistant", "content": "Hi"}]}).encode(), 400,
     "last message must be the user's"),
])
def test_malformed_requests_get_400_and_the_server_keeps_serving(bundle, start, body, status, says):
    server = start("--max-prompt-tokens", "200")
    got, _, answer = server.post("/v1/chat/completions", body)
    assert got == status and says in answer["error"]["message"], answer
    assert server.post("/v1/chat/completions", chat("Hi", 4))[0] == 200


def test_oversized_bodies_garbage_and_unknown_routes_are_refused(bundle, start):
    server = start()
    response, connection = server.request("POST", "/v1/chat/completions", b"x", {"Content-Length": str(2 << 20)})
    assert response.status == 413 and "at most" in json.loads(response.read())["error"]["message"]
    connection.close()
    with socket.create_connection((server.host, server.port), timeout=10) as client:
        client.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 400")
    assert server.post("/v1/embeddings", {"input": "x"})[0] == 404
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})[0] == 200


def test_other_addresses_need_an_api_key_checked_on_every_request(bundle, start):
    refused = subprocess.run([sys.executable, "run.py", "--serve", "--host", "0.0.0.0", "--port", "0"], cwd=bundle,
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != API_KEY_ENV})
    assert refused.returncode != 0 and "--api-key" in refused.stderr and "Serving" not in refused.stdout
    server = start("--api-key", "s3cret")
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})[0] == 401
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4},
                       {"Authorization": "Bearer wrong"})[0] == 401
    response, connection = server.request("GET", "/health")
    assert response.status == 401
    connection.close()
    status, _, answer = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4},
                                    {"Authorization": "Bearer s3cret"})
    assert status == 200 and answer["usage"]["completion_tokens"] == 4


def test_the_model_card_says_how_to_serve_and_ray_is_an_extra(bundle):
    card = (bundle / "README.md").read_text()
    assert "python run.py --serve" in card and "serve run ray_serve:app replicas=2" in card
    assert "--api-key" in card and "--address auto" in card
    assert (bundle / "requirements-ray.txt").read_text().splitlines()[-1].startswith("ray[serve]==")
    assert "ray" not in (bundle / "requirements.txt").read_text()


def test_cli_serve_prints_the_url_and_a_curl_line_and_stops_on_ctrl_c(bundle):
    process = subprocess.Popen([sys.executable, "-m", "workbench.cli", "serve", str(bundle), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line, curl = process.stdout.readline(), process.stdout.readline()
        assert line.startswith("Serving tiny at http://127.0.0.1:"), line + process.stderr.read()
        assert curl.startswith("curl http://127.0.0.1:") and "/v1/chat/completions" in curl
        url = line.split(" at ", 1)[1].split(" ", 1)[0]
        with urllib.request.urlopen(url + "/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny"
        # The printed curl line works as it is.
        asked = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
        assert json.loads(asked.stdout)["choices"][0]["message"]["role"] == "assistant"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/models", timeout=5)


def test_the_triton_card_says_what_a_client_must_do_and_where_serving_is_ready(serve_run, tmp_path):
    card = (build_bundle(serve_run, tmp_path / "triton", target="triton").path / "README.md").read_text()
    assert "What a Triton client must do" in card and "present.N.key/value" in card
    assert "python run.py --serve" in card and "Ray Serve" in card


def test_the_ray_serve_target_carries_its_scaling_in_a_ray_serve_config(serve_run, tmp_path):
    import yaml

    from exporters.serving import RayScale
    from workbench.errors import WorkbenchError

    bundle = build_bundle(serve_run, tmp_path / "ray", target="ray-serve",
                          ray_scale=RayScale(min_replicas=2, max_replicas=5, parallel=4)).path
    config = yaml.safe_load((bundle / "serve_config.yaml").read_text())
    [app] = config["applications"]
    assert app["import_path"] == "ray_serve:app" and app["route_prefix"] == "/"
    assert app["args"] == {"min_replicas": 2, "max_replicas": 5, "parallel": 4}
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8000}
    card = (bundle / "README.md").read_text()
    assert "serve run serve_config.yaml" in card and "--address auto" in card and "python run.py --serve" in card
    assert (bundle / "ray_serve.py").is_file() and "ray" not in (bundle / "requirements.txt").read_text()
    fixed = build_bundle(serve_run, tmp_path / "fixed", target="ray-serve", ray_scale=RayScale(replicas=3)).path
    assert yaml.safe_load((fixed / "serve_config.yaml").read_text())["applications"][0]["args"] == {
        "replicas": 3, "parallel": 8}
    with pytest.raises(WorkbenchError, match="min-replicas <= --max-replicas"):
        build_bundle(serve_run, tmp_path / "bad", target="ray-serve", ray_scale=RayScale(min_replicas=3, max_replicas=2))
    with pytest.raises(WorkbenchError, match="--target ray-serve"):
        build_bundle(serve_run, tmp_path / "runner", ray_scale=RayScale(replicas=2))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "runner").exists()


def test_batched_rows_of_the_int4_graph_have_their_single_stream_logits(serve_run):
    """With int8 activations (accuracy level 4) too: rows joining at different times, at different lengths,
    get to the bit the logits of the same sequence decoded alone, so batched greedy text is the runner's."""
    import numpy as np

    from workbench.generation import engine

    model = engine.CausalLM(str(serve_run / "int4" / "model.onnx"), context_length=256)
    assert model.shares_kv
    prompts = [[5, 17, 42, 8, 99, 120, 33, 64, 7, 250, 31] * 3, [5, 17], [99, 120, 33, 64, 7], [7, 250, 31, 4]]
    steps = 12

    def alone(prompt: list[int]) -> list[np.ndarray]:
        cache = model.new_cache(1, len(prompt) + steps + 1)
        logits = [model.step(cache, np.asarray([prompt]), last_only=True)[0, -1]]
        for _ in range(steps):
            logits.append(model.step(cache, np.asarray([[int(np.argmax(logits[-1]))]]), last_only=True)[0, -1])
        return logits

    expected = [alone(p) for p in prompts]
    batch, got, rows = engine.Batch(model, rows=4, capacity=256), {}, {}
    for i, prompt in enumerate(prompts):  # one joins before each step
        [(row, logits)] = batch.join([prompt])
        rows[row], got[i] = i, [logits]
        for row, logits in batch.step({r: int(np.argmax(got[j][-1])) for r, j in rows.items()}).items():
            got[rows[row]].append(logits)
    while any(len(got[i]) <= steps for i in got):
        feed = {r: int(np.argmax(got[j][-1])) for r, j in rows.items() if len(got[j]) <= steps}
        for row in set(rows) - set(feed):
            if batch.lengths[row] is not None:
                batch.leave(row)
        for row, logits in batch.step(feed).items():
            got[rows[row]].append(logits)
    for i in range(len(prompts)):
        np.testing.assert_array_equal(np.stack(got[i]), np.stack(expected[i]))
