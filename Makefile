# Every target creates and uses .venv; torch is pinned through requirements/constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint bench demo validate validate-calibration clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements/constraints.txt
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

# each benchmark's output goes into its section of docs/benchmarks.md (bench/record.py)
bench: $(STAMP)
	$(BIN)/python bench/record.py optimizer
	$(BIN)/python bench/record.py sensitivity
	$(BIN)/python bench/record.py store
	$(BIN)/python bench/record.py api
	$(BIN)/python bench/record.py load --seconds 60
	$(BIN)/python bench/record.py overhead --rounds 3
	$(BIN)/python bench/record.py memory
	$(BIN)/python bench/record.py influence --rounds 3 --model cnn
	$(BIN)/python bench/record.py influence --rounds 5
	$(BIN)/python bench/record.py retrain

validate: $(STAMP)
	$(BIN)/ivon-diag validate

# the LOO's calibration at N up to 20,000, on images and under memorized flips: docs/calibration.md
validate-calibration: $(STAMP)
	$(BIN)/python -m research.calibration

demo: $(STAMP)
	$(BIN)/ivon-diag demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
