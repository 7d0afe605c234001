# organtrain: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,test
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test test-fast bench lint format clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (the package itself is editable).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# tf_keras' ImageDataGenerator is the reference the augmentation is checked (tests) and
	# timed (bench) against. Its wheel depends on the full `tensorflow` build, which would
	# land on top of tensorflow-cpu, hence --no-deps (it runs on the installed TensorFlow).
	$(BIN)/python -m pip install --quiet "tf-keras>=2.21,<2.22" --no-deps
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/organtrain demo --config jobs/demo.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the end-to-end sweep, nightly and SLURM
# tests (marked slow), about 2 minutes on 2 cores. `make test` (and CI) runs them all.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The input pipeline benchmark (bench/RESULTS.md), against tf_keras' ImageDataGenerator
# (installed by `install`; its transforms need scipy, which scikit-learn brings too).
# Small runs while developing: make bench BENCH_ARGS="--images-per-diagnosis 40 --repeats 1"
BENCH_ARGS ?=
bench: install
	$(BIN)/python bench/input_pipeline.py --out bench/results.json $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf demo-output test-artifacts .pytest_cache
