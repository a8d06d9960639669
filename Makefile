# `make demo` and `make test` do all set-up themselves on a fresh machine (through `make setup`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ifnet-installed

.PHONY: setup demo test bench-enhance bench-attention bench-labeler bench-quality bench-latency bench-load bench-fuzz clean

setup: $(STAMP)

# Re-installs when pyproject.toml or constraints.txt change. pip takes torch/torchvision from the
# pinned constraints (a GPU user installs their own CUDA build of torch first; ranges allow it).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@command -v java >/dev/null 2>&1 || { echo "java not found: installing default-jre-headless (for METEOR)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq default-jre-headless >/dev/null; }
	@test -x /usr/bin/chromium || { echo "chromium not found: installing Debian's chromium (browser tests of ifnet serve)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/ifnet demo --out demo-out

test: setup
	$(VENV)/bin/python -m pytest -q

bench-enhance: setup
	$(PY) benchmarks/bench_enhance.py

bench-attention: setup
	$(PY) benchmarks/bench_attention.py

bench-labeler: setup
	$(PY) benchmarks/bench_labeler.py

bench-quality: setup
	$(PY) benchmarks/bench_quality.py

bench-latency: setup
	$(PY) benchmarks/bench_latency.py

bench-load: setup
	$(PY) benchmarks/bench_load.py

bench-fuzz: setup
	$(PY) benchmarks/bench_fuzz.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache demo-out
