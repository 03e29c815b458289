# The commands the README shows. Each creates .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench figures lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m jaxbp compare
	$(PY) -m jaxbp explain
	$(PY) -m jaxbp explain --model gpt
	$(PY) -m jaxbp train

test: $(STAMP)
	$(PY) -m pytest -n auto --durations=15

bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

# The pictures in README.md and docs/ (docs/figures/), and the benchmark plots redrawn from
# the committed results.json (nothing is timed again). The GPT's curve trains it with its
# defaults: a few minutes on a CPU.
FIGURES := docs/figures
figures: $(STAMP)
	mkdir -p $(FIGURES)
	$(PY) -m jaxbp explain --plot $(FIGURES)/explain.png > /dev/null
	$(PY) -m jaxbp explain --model gpt --plot $(FIGURES)/attention.png > /dev/null
	$(PY) -m jaxbp compare --plot $(FIGURES)/compare.png > /dev/null
	$(PY) -m jaxbp train --check --plot $(FIGURES)/train.png > /dev/null
	$(PY) -m jaxbp train --model gpt --sample-chars 0 --plot $(FIGURES)/train_gpt.png > /dev/null
	$(PY) -m benchmarks.report benchmarks/results/cpu

lint: $(STAMP)
	$(PY) -m ruff check jaxbp tests benchmarks
	$(PY) -m ruff format --check jaxbp tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
