# The README's two commands: `make demo` and `make test`.
# Both create a local virtual environment (.venv) with the package installed, on a
# machine that has only Python >= 3.11 and pip.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.apsnake-installed
CORES ?= all

.PHONY: demo test venv clean dry-run slurm-test

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "apsnake needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(BIN)/snakemake --profile profiles/local --cores $(CORES)
	@$(BIN)/apsnake registry out/registry
	@$(BIN)/apsnake apdb summary --root out
	@echo "Night report: out/qa/report.html (open it in a browser)"

dry-run: $(STAMP)
	$(BIN)/snakemake --profile profiles/local -n

test: $(STAMP)
	$(BIN)/python -m pytest

# The workflow on a throw-away single-node SLURM cluster against a local run (needs root;
# installs Debian's slurmctld, slurmd and munge when missing): tests/slurm/run_slurm_test.sh.
slurm-test: $(STAMP)
	@$(BIN)/python -c 'import importlib.metadata as m, sys; v = m.version("snakemake-executor-plugin-slurm"); sys.exit(tuple(map(int, v.split(".")[:2])) < (2, 8))' 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet -e '.[slurm]'
	tests/slurm/run_slurm_test.sh

clean:
	rm -rf out data .snakemake
