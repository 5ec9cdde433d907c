"""The bundle's Ray Serve app (ray_serve.py): a private Ray on 127.0.0.1 with 2 replicas behind Ray's proxy,
driven over real HTTP; one replica killed with SIGKILL under load loses no request silently. The ray-serve
target's config on an existing cluster (`ray start --head`): its autoscaling bounds applied, replicas scaling."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from serve_helpers import PROMPTS, chat, greedy_text

pytest.importorskip("ray.serve", reason="Ray Serve is an optional extra: pip install -r requirements-ray.txt")
# Starting Ray and two replicas takes a minute on 2 cores.
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(port: int, body: dict, timeout: float = 60) -> tuple[int | str, str | None]:
    """(status or the connection error, the answer's text); a stream that ends without [DONE] is an error."""
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if not body.get("stream"):
            payload = json.loads(response.read())
            return response.status, payload["choices"][0]["message"]["content"] if response.status == 200 else None
        if response.status != 200:
            return response.status, None
        pieces, done = [], False
        for line in response:
            line = line.decode().strip()
            if line == "data: [DONE]":
                done = True
                break
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    return "error event", None
                pieces.append(event["choices"][0]["delta"].get("content") or "")
        return (200, "".join(pieces)) if done else ("stream cut", None)
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
        return type(error).__name__, None


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


@pytest.fixture(scope="module")
def ray_app(bundle):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "ray_serve.py", "--replicas", "2", "--port", str(port), "--parallel", "4"], cwd=bundle,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    line = process.stdout.readline()
    assert f"http://127.0.0.1:{port}/v1" in line, line
    yield port
    process.send_signal(signal.SIGINT)  # the app is deleted and the private Ray stops with the process
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def test_two_replicas_answer_through_the_proxy_like_the_runner(bundle, ray_app):
    expected = greedy_text(bundle, PROMPTS[0], 24)
    assert post(ray_app, chat(PROMPTS[0], 24)) == (200, expected)
    assert post(ray_app, {**chat(PROMPTS[0], 24), "stream": True}) == (200, expected)
    pids = {health(ray_app)["pid"] for _ in range(40)}
    assert len(pids) == 2


def test_a_killed_replica_loses_no_request_silently(bundle, ray_app):
    lengths = [30 + 5 * i for i in range(8)]
    expected = {i: greedy_text(bundle, PROMPTS[i], lengths[i]) for i in range(8)}
    outcomes: list[tuple[int, int | str, bool]] = []  # client, first status, whether the retries ended right
    stop = threading.Event()

    def client(i: int) -> None:
        body = {**chat(PROMPTS[i], lengths[i]), "stream": bool(i % 2)}
        while not stop.is_set():
            status, text = post(ray_app, body)
            if status == 200:
                outcomes.append((i, status, text == expected[i]))
                continue
            # An error the client sees: retrying must give the right answer.
            deadline = time.monotonic() + 120
            while status != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
                status_retry, text = post(ray_app, body)
                status = status_retry
            outcomes.append((i, "retried", status == 200 and text == expected[i]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(3)
    victim = health(ray_app)["pid"]
    os.kill(victim, signal.SIGKILL)
    time.sleep(8)
    stop.set()
    for thread in threads:
        thread.join(timeout=180)
    assert outcomes and all(right for _, _, right in outcomes), [o for o in outcomes if not o[2]]
    assert {i for i, _, _ in outcomes} == set(range(8))
    # Ray replaced the killed replica: two live replicas again, neither of them the victim.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = {health(ray_app)["pid"] for _ in range(20)}
        if len(pids) == 2 and victim not in pids:
            break
        time.sleep(1)
    assert len(pids) == 2 and victim not in pids


# -- the ray-serve target: its Ray Serve config on an existing cluster, autoscaling bounds applied ----------


def _get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait(what: str, ready, seconds: float):
    """`ready()`'s first true value within `seconds` (None and errors mean not yet)."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        try:
            value = ready()
            if value:
                return value
        except (OSError, KeyError, ValueError) as error:
            last = error
        time.sleep(1)
    raise AssertionError(f"{what} did not happen within {seconds} s ({last})")


@pytest.fixture(scope="module")
def ray_cluster():
    """An existing Ray cluster, as a user has one: `ray start --head` on 127.0.0.1 in a folder of its own.

    Its temporary folder is short (Ray's socket paths must be); the whole process group is ended after.
    """
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    ray = Path(sys.executable).with_name("ray")
    process = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "4", "--temp-dir", temp,
         "--disable-usage-stats"],
        cwd=temp, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait("Ray's dashboard", lambda: _get_json(f"http://127.0.0.1:{dashboard}/api/version"), 180)
        yield f"127.0.0.1:{port}", dashboard
    finally:
        for sent in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sent)
                process.wait(timeout=30)
                break
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        shutil.rmtree(temp, ignore_errors=True)


def test_the_ray_serve_target_runs_on_a_cluster_within_its_autoscaling_bounds(serve_run, ray_cluster, tmp_path):
    """`bundle --target ray-serve --min-replicas 1 --max-replicas 2`, started with `serve run serve_config.yaml`
    on an existing cluster: Ray reports those bounds, starts one replica, and under load scales to two."""
    address, dashboard = ray_cluster
    result = subprocess.run(
        [sys.executable, "-m", "workbench.cli", "bundle", str(serve_run), "-o", str(tmp_path / "ray"), "--target",
         "ray-serve", "--min-replicas", "1", "--max-replicas", "2", "--parallel", "2", "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    bundle = tmp_path / "ray"
    config = bundle / "serve_config.yaml"
    port = free_port()
    config.write_text(config.read_text().replace("port: 8000", f"port: {port}"))
    assert "serve run serve_config.yaml" in (bundle / "README.md").read_text()
    subprocess.run([str(Path(sys.executable).with_name("serve")), "run", "serve_config.yaml", "--address", address,
                    "--non-blocking"], cwd=bundle, check=True, timeout=300, capture_output=True,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    _wait("the first answer", lambda: health(port)["status"] == "ok", 240)

    def deployment() -> dict:
        applications = _get_json(f"http://127.0.0.1:{dashboard}/api/serve/applications/")["applications"]
        return applications["int4-workbench"]["deployments"]["OpenAIServer"]

    scaling = deployment()["deployment_config"]["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (1, 2)
    assert [r["state"] for r in deployment()["replicas"]] == ["RUNNING"]
    expected = greedy_text(bundle, PROMPTS[0], 24)
    assert post(port, chat(PROMPTS[0], 24)) == (200, expected)

    stop, answers = threading.Event(), []

    def client(i: int) -> None:  # more answers at once than one replica's 2 rows
        while not stop.is_set():
            answers.append(post(port, chat(PROMPTS[i % len(PROMPTS)], 64), timeout=120)[0])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    try:
        running = _wait("a second replica", lambda: [r for r in deployment()["replicas"] if r["state"] == "RUNNING"]
                        if len(deployment()["replicas"]) >= 2 else None, 240)
        assert len(deployment()["replicas"]) <= 2  # never beyond the upper bound
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=180)
    assert running and set(answers) == {200}
