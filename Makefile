# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# checkov pins many packages of its own, so it lives in a venv of its own.
CHECKOV_VENV ?= .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov

.PHONY: test test-fast docker-test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(CHECKOV):
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet checkov

# Two processes: most tests wait on a subprocess importing TensorFlow or on a
# server, so two of them share two cores well (17 minutes down to 11 here).
test: $(STAMP) $(CHECKOV)
	CHECKOV=$(CHECKOV) $(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=25

# The inner loop: the tests that need no trained model, server or subprocess (about
# half the suite, a minute or two); `make test` stays the whole suite, which CI runs.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=10

# The Dockerfile's images built and the local overlay's chain run in containers of them
# (tests/docker_checks.py). Installs and starts Docker when missing (Debian's docker.io: root).
docker-test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -s -v tests/docker_checks.py

demo: $(STAMP)
	$(BIN)/accresnet demo

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs demo-output .pytest_cache
