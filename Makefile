# organtrain: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,test
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install demo test bench lint format clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes (the package itself is editable).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/organtrain demo --config jobs/demo.yaml

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The input pipeline benchmark (bench/RESULTS.md). Its baseline is tf_keras'
# ImageDataGenerator, but the tf-keras wheel depends on the full `tensorflow` wheel, which
# would install a second TensorFlow build over tensorflow-cpu: so it is installed with
# --no-deps. ImageDataGenerator's transforms need scipy (today scikit-learn brings it too).
# Small runs while developing: make bench BENCH_ARGS="--images-per-diagnosis 40 --repeats 1"
BENCH_ARGS ?=
bench: install
	$(BIN)/python -m pip install --quiet scipy "tf-keras>=2.21,<2.22" --no-deps
	$(BIN)/python bench/input_pipeline.py --out bench/results.json $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

clean:
	rm -rf demo-output test-artifacts .pytest_cache
