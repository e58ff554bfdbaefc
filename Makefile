# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment in $(VENV) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.catkd-installed
OUT ?= outputs/demo
# What `make install` installs: the test, S3 and timm extras here and in CI; the Docker image
# asks for the S3 and timm extras only, with its own constraints (docker/constraints.sh).
EXTRAS ?= test,s3,timm
CONSTRAINTS ?= constraints.txt
PIP_ARGS ?=

.PHONY: demo test test-fast lint install clean

install: $(STAMP)

# constraints.txt pins the versions the suite was last run with: pip resolves it at once
# instead of backtracking for minutes through botocore/aiobotocore/boto3 releases.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -c $(CONSTRAINTS) -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/catkd demo --out $(OUT)

# The full suite, which CI runs (bash .ci/run), after the linter.
test: lint
	$(BIN)/python -m pytest -q --durations=15 tests

# The inner loop: every test not marked slow (no Ray Train start-ups), in a few minutes.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) outputs
