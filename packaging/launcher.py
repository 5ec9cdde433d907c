"""Entry point of the desktop build: the app, or a Python module the app starts as a helper process.

The core runs blocking steps as `sys.executable -m workbench.subprocess_job`; inside the built app
sys.executable is this program, so `-m MODULE ...` runs that module as Python would.
`--smoke-test` checks a fresh build end to end: the window opens offscreen, then the demo model is
quantized, bundled and verified in a temporary folder (a few minutes; see packaging/README.md).
"""

from __future__ import annotations

import os
import runpy
import sys
import tempfile
from pathlib import Path


def smoke_test() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from exporters.bundle import build_bundle, verify_bundle
    from ui.app import create_app
    from ui.main_window import MainWindow
    from workbench.run.pipeline import quantize_run
    from workbench.settings import QuantSettings

    def show(fraction: float, message: str) -> None:
        print(f"\r{fraction:4.0%} {message[:70]:<70}", end="", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="int4-workbench-smoke-") as folder:
        app = create_app(sys.argv[:1])
        window = MainWindow(Path(folder) / "runs")
        window.show()
        app.processEvents()
        window.close()
        print("window: ok", file=sys.stderr)
        run = Path(folder) / "runs" / "demo"
        quantize_run("demo", run, QuantSettings(method="rtn"), progress=show)
        bundle = build_bundle(run, Path(folder) / "bundle", progress=show)
        result = verify_bundle(bundle.path, progress=show)
        print(file=sys.stderr)
        for check in result.checks:
            print(f"{check.name}: {'ok' if check.ok else 'FAILED'} ({check.detail})", file=sys.stderr)
    return 0 if result.ok else 1


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "-m":
        module = sys.argv[2]
        sys.argv = [module, *sys.argv[3:]]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    if sys.argv[1:] == ["--smoke-test"]:
        return smoke_test()
    from ui.app import main as app_main

    return app_main()


if __name__ == "__main__":
    sys.exit(main())
