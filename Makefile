# Two commands do all the setup on a fresh machine (see README):
#   make run    the main job: both training stages on the built-in dataset (tiny preset, CPU)
#   make test   lint + the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run demo test lint bench bench-models clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) train.py --config configs/finetune.py --workdir workdir

demo: $(STAMP)
	$(PY) -m qtl_jax.compress

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# One worker per core, at most 4 (each holds its own JAX runtime, session fixtures and compilation cache);
# worksteal keeps both cores busy to the end when the long end-to-end tests come last.
test: lint
	$(PY) -m pytest -n auto --maxprocesses 4 --dist worksteal

bench: $(STAMP)
	$(PY) benchmarks/compressors.py

bench-models: $(STAMP)
	$(PY) benchmarks/models.py

clean:
	rm -rf $(VENV)
