# The two commands a newcomer types: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# `make demo` installs what otakit needs to run (the `all` extra: server, agent, simulators);
# everything else (`make test`, lint, benchmarks) adds the test tools (the `dev` extra).
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed-dev

.PHONY: demo test bench bench-agent bench-server lint typecheck pytest pytest-newest services clean

$(BIN)/python:
	scripts/make-venv.sh "$(PYTHON)" "$(VENV)"

# Reinstall only when the project's metadata changed. The dev install includes the run one, so
# it marks both done: `make test` then `make demo` installs nothing more.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(RUN_STAMP)

demo: $(RUN_STAMP)
	$(BIN)/otakit demo

# The benchmark suite (6-10 min): flash wear, device agent, MQTT, update server (PostgreSQL from
# `services`; installs wrk and nginx with apt-get if missing), a 1,000-device fleet; then
# bench/results/summary.md. Each step writes bench/results/*.json. Full fleet: make bench-fleet.
bench: $(STAMP) services
	$(BIN)/python bench/flash_wear.py
	$(BIN)/python bench/agent_bench.py
	$(BIN)/python bench/agent_idle.py
	$(BIN)/python bench/mqtt_bench.py
	$(BIN)/python bench/server_bench.py
	$(BIN)/python bench/fleet_bench.py --quick
	$(BIN)/python bench/summary.py

# The device agent's CPU and memory per MiB downloaded, next to curl (~1 min).
bench-agent: $(STAMP)
	$(BIN)/python bench/agent_bench.py

# The agent's memory while idle between check-ins, next to a bare Python and httpx (~20 s).
.PHONY: bench-agent-idle
bench-agent-idle: $(STAMP)
	$(BIN)/python bench/agent_idle.py

# Update server vs nginx on loopback (installs wrk and nginx with apt-get if missing; ~4 min).
bench-server: $(STAMP) services
	$(BIN)/python bench/server_bench.py

# MQTT publisher vs a stop-and-wait sender, on a Mosquitto the script starts (~1 min).
.PHONY: bench-mqtt
bench-mqtt: $(STAMP)
	$(BIN)/python bench/mqtt_bench.py

# 10,000 simulated devices updating against one server, next to nginx (~5 min; --quick: 1,000).
.PHONY: bench-fleet
bench-fleet: $(STAMP)
	$(BIN)/python bench/fleet_bench.py

# 1k, 10k and 100k registered devices with a 3-phase rollout, SQLite and PostgreSQL: server CPU per
# report, idle check-in, rollout view and dashboard refresh, next to nginx (~15 min).
.PHONY: bench-scale
bench-scale: $(STAMP) services
	$(BIN)/python bench/scale_bench.py

services:
	scripts/ensure-services.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# mypy --strict over src/otakit, tests and bench (the `files` of [tool.mypy] in pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) services
	$(BIN)/pytest

# The whole suite on $(PYTHON) (3.11), then the fast subset on the newest Python found (3.13 or
# 3.12, on PATH or under pyenv) in its own venv, .venv-newest (scripts/test-newest.sh).
test: lint typecheck pytest pytest-newest

pytest-newest:
	scripts/test-newest.sh "$(BIN)/python"

# The unit tests only (no services, no processes, no sockets; under a minute): what to run while
# editing. --no-services fails a unit test that starts anything (docs/testing.md). Extra pytest
# arguments: make test-fast ARGS="tests/test_rules.py -x".
.PHONY: test-fast
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "unit and not slow" --no-services $(ARGS)

clean:
	rm -rf $(VENV) .venv-newest .pytest_cache .mypy_cache .ruff_cache .hypothesis
