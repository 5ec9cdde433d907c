"""Run a blocking step (ONNX export, GGUF conversion) in a child process that Cancel can stop.

The child calls `module:function(**kwargs, progress=...)` and reports on its stdout, one JSON
object per line: {"progress": f, "message": m}, then {"result": ...} or {"error": m, "user": bool}.
Its stderr (library warnings, progress bars) goes to this process's log at debug level.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

from workbench.errors import JobCancelled, WorkbenchError
from workbench.jobs import Cancelled, Progress, never_cancelled, no_progress
from workbench.errors import write_errno

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1
TERMINATE_GRACE_SECONDS = 5.0
PARENT_ENV = "INT4_WORKBENCH_PARENT_PID"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def run_in_subprocess(
    target: str,
    kwargs: dict,
    *,
    progress: Progress = no_progress,
    cancelled: Cancelled = never_cancelled,
    expected_seconds: float = 30.0,
    message: str = "working",
) -> Any:
    """Call `target` ("package.module:function") in a child; return its JSON-able result.

    Between the child's own reports, progress creeps towards 95 % of `expected_seconds` so the
    user sees the step is alive; the latest message comes with the elapsed time.
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "workbench.subprocess_job"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())},
    )
    child.stdin.write(json.dumps({"target": target, "kwargs": kwargs}))
    child.stdin.close()
    replies: list[dict] = []
    stderr_tail: list[str] = []
    readers = [
        threading.Thread(target=_read_replies, args=(child.stdout, replies), daemon=True),
        threading.Thread(target=_read_log, args=(child.stderr, stderr_tail), daemon=True),
    ]
    for reader in readers:
        reader.start()
    began = time.monotonic()
    state = {"fraction": 0.0, "message": message}
    try:
        while child.poll() is None:
            if cancelled():
                raise JobCancelled()
            _take_progress(replies, state)
            elapsed = time.monotonic() - began
            fraction = max(state["fraction"], min(0.95, elapsed / expected_seconds))
            progress(fraction, f"{state['message']} ({elapsed:.0f} s)")
            time.sleep(POLL_SECONDS)
    finally:
        if child.poll() is None:
            _stop(child)
    for reader in readers:
        reader.join(timeout=5)
    final = next((r for r in reversed(replies) if "result" in r or "error" in r), None)
    if final is None:
        tail = "".join(stderr_tail[-20:])
        raise WorkbenchError(
            f"The {message} step stopped unexpectedly (exit code {child.returncode}); it may have "
            f"run out of memory. Last output:\n{tail}"
        )
    if "error" in final:
        if final.get("user"):
            raise WorkbenchError(final["error"])
        if final.get("errno"):  # a full disk or a read-only folder: the caller knows which folder to name
            raise OSError(final["errno"], os.strerror(final["errno"]))
        raise RuntimeError(f"{message} failed: {final['error']}\n{final.get('traceback', '')}")
    return final["result"]


def _take_progress(replies: list[dict], state: dict) -> None:
    for reply in replies:
        if "progress" in reply:
            state["fraction"], state["message"] = reply["progress"], reply["message"]


def _read_replies(stream, replies: list[dict]) -> None:
    for line in stream:
        try:
            replies.append(json.loads(line))
        except json.JSONDecodeError:
            log.debug("child: %s", line.rstrip())


def _read_log(stream, tail: list[str]) -> None:
    for line in stream:
        log.debug("child: %s", line.rstrip())
        tail.append(line)
        del tail[:-50]


def _stop(child: subprocess.Popen) -> None:
    child.terminate()
    try:
        child.wait(TERMINATE_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _emit(reply: dict) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


def _die_with_parent() -> None:
    """Have the kernel kill this child when its parent dies, however it dies (SIGKILL included), so no
    export keeps running for nobody. Linux only; elsewhere the parent's own cleanup has to do."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(os.environ.get(PARENT_ENV, os.getppid())):  # the parent died before prctl
        os._exit(1)


def _child() -> None:
    _die_with_parent()
    request = json.loads(sys.stdin.read())
    module_name, function_name = request["target"].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        result = function(
            **request["kwargs"],
            progress=lambda fraction, message: _emit({"progress": fraction, "message": message}),
        )
    except WorkbenchError as error:
        _emit({"error": str(error), "user": True})
    except Exception as error:  # the parent re-raises it with the child's traceback
        _emit({"error": f"{type(error).__name__}: {error}", "user": False, "traceback": traceback.format_exc(),
               "errno": write_errno(error)})
    else:
        _emit({"result": result})


if __name__ == "__main__":
    _child()
