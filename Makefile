# The README's two commands: `make demo` and `make test`. Both set up from nothing.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= jobs/configs/demo.yaml

.PHONY: setup demo test chaos bench lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/python jobs/stage1.py --config $(CONFIG)

# pytest's addopts leave out the long chaos scenarios (-m 'not chaos'); the short one (R7a) runs here
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# the full chaos suite on a local multi-node Ray; writes runs/chaos/report.md and report.json
chaos: setup
	rm -f runs/chaos/report.json runs/chaos/report.md
	$(BIN)/python -m pytest -q -m 'chaos or not chaos' tests/chaos
	$(BIN)/python -m pytest -q -m chaos tests --ignore=tests/chaos  # long variants kept beside their module

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --quick || exit 1; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs data .pytest_cache
