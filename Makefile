# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates (or reuses) the virtual environment in $(VENV) and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.catkd-installed
OUT ?= outputs/demo

.PHONY: demo test install clean

install: $(STAMP)

# constraints.txt pins the versions the suite was last run with: pip resolves it at once
# instead of backtracking for minutes through botocore/aiobotocore/boto3 releases.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,s3]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/catkd demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) outputs
