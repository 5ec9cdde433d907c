"""The bundle's OpenAI server under load: throughput with 1, 4 and 8 streams, time to first token, a soak.

    python benchmarks/serve.py BUNDLE [--soak-s 600] [--rounds 3] [--tokens 128]

BUNDLE is a runner bundle (`int4-workbench bundle RUN -o BUNDLE`). The server (`run.py --serve`,
8 rows, continuous batching) runs as its own process on a loopback port; clients are threads here.

- Throughput: N clients stream one greedy answer of --tokens tokens each, started together; decode
  tokens/s = all tokens after each stream's first, over the time from the first first-token to the
  last token. Medians over --rounds, alternating. TTFT p50/p95: every stream of each stream count's rounds.
- Soak: 16 clients for --soak-s seconds, random prompts, lengths and streaming, 20 % of them
  disconnecting early. Every answer that was not abandoned must come back complete (finish reason,
  [DONE], the token count asked for or an end of text): otherwise it is `lost`. Its text is compared
  with the greedy answer of the same prompt decoded alone (the bundle's engine in this process):
  `exact` or `differs`. A batched row is decoded at its own positions (engine.Batch) and gives the
  single-stream text, with int8 activations (accuracy level 4, the default) too: `differs` must be 0.
- Peak RSS of the server process (and any children), sampled every 0.25 s.

One JSON object on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporters.runner import chat_format  # noqa: E402
from exporters.serving import start_server  # noqa: E402
from workbench.generation import engine  # noqa: E402

PROMPTS = [
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your new job.",
    "Tell me everything you know about the Moon.",
    "Write a recipe for bread and explain each step.",
    "Describe the history of the printing press.",
    "Write a poem about the sea, then explain it.",
]
STREAMS = (1, 4, 8)
SOAK_CLIENTS = 16


class Client:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    def ask(self, prompt: str, tokens: int, stream: bool, leave_after: int | None = None) -> dict:
        """One chat request; returns status, text, finish, usage, first-token and end times."""
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        began = time.perf_counter()
        connection = http.client.HTTPConnection(self.host, self.port, timeout=600)
        try:
            connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            if leave_after == 0:  # leave before any answer
                return _leave(connection)
            response = connection.getresponse()
            if response.status != 200 or not stream:
                payload = json.loads(response.read())
                if response.status != 200:
                    return {"status": response.status, "retry_after": response.getheader("Retry-After")}
                choice = payload["choices"][0]
                return {"status": 200, "text": choice["message"]["content"], "finish": choice["finish_reason"],
                        "tokens": payload["usage"]["completion_tokens"], "first": None, "end": time.perf_counter(),
                        "began": began, "done": True}
            pieces, finish, first, usage, done, chunks = [], None, None, None, False, 0
            for raw in response:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    done = True
                    break
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return {"status": "error event", "message": event["error"]["message"]}
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event["choices"]:
                    content = choice["delta"].get("content")
                    if content:
                        first = first or time.perf_counter()
                        pieces.append(content)
                        chunks += 1
                        if leave_after is not None and chunks >= leave_after:
                            return _leave(connection)
                    finish = choice["finish_reason"] or finish
            return {"status": 200, "text": "".join(pieces), "finish": finish, "first": first, "end": time.perf_counter(),
                    "began": began, "tokens": usage["completion_tokens"] if usage else None, "done": done}
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as error:
            return {"status": f"{type(error).__name__}: {error}", "after_s": round(time.perf_counter() - began, 2)}
        finally:
            connection.close()


def _leave(connection: http.client.HTTPConnection) -> dict:
    """Hang up; the server may have closed first (its answer was quick), which is a hang-up too."""
    try:
        connection.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    return {"status": "left"}


class PeakRss:
    """The largest resident set of a process and its children, sampled every 0.25 s."""

    def __init__(self, pid: int):
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


class Reference:
    """The greedy answer of each prompt decoded alone, by the bundle's own engine and chat format."""

    def __init__(self, bundle: Path, tokens: int):
        settings = json.loads((bundle / "runner.json").read_text())
        self.tokenizer = Tokenizer.from_file(str(bundle / settings["tokenizer"]))
        model = engine.CausalLM(str(bundle / settings["model"]), context_length=settings["context_length"])
        self.tokens = {}
        for prompt in PROMPTS:
            ids = chat_format.encode(self.tokenizer, settings["chat"], [{"role": "user", "content": prompt}])
            result = engine.generate(model, ids, engine.GenerationConfig(max_new_tokens=tokens),
                                     tokenizer=self.tokenizer, eos_token_ids=settings["eos_token_ids"])
            self.tokens[prompt] = (result.tokens, result.finish_reason)

    def text(self, prompt: str, limit: int) -> str:
        tokens, _ = self.tokens[prompt]
        return self.tokenizer.decode(tokens[:limit], skip_special_tokens=True)


def throughput(client: Client, streams: int, tokens: int) -> dict:
    gate = threading.Barrier(streams)
    results: list[dict] = [{}] * streams

    def run(i: int) -> None:
        gate.wait()
        results[i] = client.ask(PROMPTS[i % len(PROMPTS)], tokens, stream=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bad = [r for r in results if r.get("status") != 200]
    if bad:
        raise SystemExit(f"a throughput request failed: {bad[0]}")
    decoded = sum(r["tokens"] - 1 for r in results)
    window = max(r["end"] for r in results) - min(r["first"] for r in results)
    return {"decode_tokens_per_s": decoded / window, "ttft_s": [r["first"] - r["began"] for r in results],
            "tokens": sum(r["tokens"] for r in results)}


def soak(client: Client, reference: Reference, seconds: float, tokens: int, seed: int) -> dict:
    counts = {"answered": 0, "exact": 0, "differs": 0, "left": 0, "busy_503": 0, "lost": 0}
    problems: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run(i: int) -> None:
        rng = random.Random(seed + i)
        while time.monotonic() < deadline:
            prompt, limit, stream = rng.choice(PROMPTS), rng.randint(4, tokens), rng.random() < 0.5
            leave = rng.choice([0, 1, 3, 10]) if rng.random() < 0.2 else None
            if leave and not stream:
                leave = 0
            result = client.ask(prompt, limit, stream, leave)
            with lock:
                if result["status"] == "left":
                    counts["left"] += 1
                elif result["status"] == 503:
                    counts["busy_503"] += 1
                    time.sleep(float(result.get("retry_after") or 1))
                elif not _complete(result, limit):
                    counts["lost"] += 1
                    problems.append(f"{prompt!r} {limit}: {result}")
                else:
                    counts["answered"] += 1
                    same = result["text"] == reference.text(prompt, limit)
                    counts["exact" if same else "differs"] += 1
                    if not same:
                        problems.append(f"{prompt!r} {limit}: {result['text']!r}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SOAK_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {**counts, "problems": problems[:5]}


def _complete(result: dict, limit: int) -> bool:
    """A whole answer: status 200, [DONE] for a stream, and as many tokens as asked unless the text ended."""
    if result["status"] != 200 or not result.get("done") or result.get("tokens") is None:
        return False
    return (result["finish"] == "length" and result["tokens"] == limit) or (result["finish"] == "stop" and result["tokens"] < limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--soak-s", type=float, default=600, help="0: no soak")
    parser.add_argument("--streams", type=int, nargs="*", default=list(STREAMS), help="none: no throughput runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundle = Path(args.bundle)
    reference = Reference(bundle, args.tokens)
    server = start_server(bundle, port=0, parallel=8)
    rss = PeakRss(server.process.pid)
    try:
        host, port = server.url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        client = Client(host, int(port))
        client.ask(PROMPTS[0], 8, stream=False)  # warm-up
        result: dict = {"bundle": str(bundle), "decode_tokens_per_s": {}}
        # Rounds alternate between the stream counts, so a machine busy with other work slows all alike.
        measured = {streams: [] for streams in args.streams}
        for _ in range(args.rounds):
            for streams in args.streams:
                measured[streams].append(throughput(client, streams, args.tokens))
        for streams, rounds in measured.items():
            result["decode_tokens_per_s"][streams] = round(statistics.median(r["decode_tokens_per_s"] for r in rounds), 1)
            ttfts = sorted(t for r in rounds for t in r["ttft_s"])
            result[f"ttft_{streams}_streams_s"] = {"p50": round(statistics.median(ttfts), 3),
                                                   "p95": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3)}
        speeds = result["decode_tokens_per_s"]
        if len(speeds) > 1:
            result["speedup_most_vs_fewest_streams"] = round(speeds[max(speeds)] / speeds[min(speeds)], 2)
        if args.soak_s > 0:
            began = time.monotonic()
            result["soak"] = {"seconds": args.soak_s, "clients": SOAK_CLIENTS,
                              **soak(client, reference, args.soak_s, args.tokens, args.seed)}
            result["soak"]["took_s"] = round(time.monotonic() - began, 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", "/health")
        result["server_after"] = json.loads(connection.getresponse().read())
    finally:
        result["peak_rss_mib"] = round(rss.stop() / 2**20, 1)
        server.stop()
    result["load_average"] = [round(x, 2) for x in psutil.getloadavg()]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
