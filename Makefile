# One entry point for people and CI. Each target creates .venv from the lock (requirements.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test docs reproduce reproduce-paper fashion-mnist lock clean-venv

# the README's install lines: every package from the hashed lock, then this package, editable
$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# lint, format check and type check first (seconds), then the tests in two processes
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks probes
	$(BIN)/ruff format --check src tests benchmarks probes
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2

# the documentation site (docs/, mkdocs.yml) into site/, offline; any warning fails the build.
# NO_MKDOCS_2_WARNING silences Material's banner about MkDocs 2.0, which is advice, not a build warning.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# Debian's dataset-fashion-mnist package, where apt-get exists; otherwise the loader downloads it.
fashion-mnist:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST: found in /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist) \
			|| echo "warning: could not install dataset-fashion-mnist (needs root or password-less sudo: run sudo apt-get install dataset-fashion-mnist yourself); the loader will download Fashion-MNIST on first use"; \
	else \
		echo "no apt-get: Fashion-MNIST will be downloaded into data/raw/fashion-mnist on first use"; \
	fi

reproduce: $(STAMP) fashion-mnist
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The full-size profile for one GPU: replaces params.yaml (git checkout params.yaml undoes it).
reproduce-paper: $(STAMP) fashion-mnist
	cp profiles/paper.yaml params.yaml
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# rewrite the lock from pyproject.toml's ranges (the newest versions they allow), then review its diff
lock:
	$(PYTHON) .ci/lock.py

clean-venv:
	rm -rf $(VENV)
