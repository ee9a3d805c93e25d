# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   := demo

.PHONY: install test test-all test-quick lint docs demo docs-figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,align,clip,timm,lora]'
	touch $(STAMP)

install: $(STAMP)

# Two processes (pytest-xdist): the tests run one torch thread each, so two cores take half the time.
test: install
	$(BIN)/python -m pytest -n 2 -m "not sweep"

# Also the sweeps over every registry architecture (float64 LRP-0 = gradient x input on each CNN): minutes more.
test-all: install
	$(BIN)/python -m pytest -n 2

# The fast loop: everything but the tests marked slow (processes, the docs, full-size models), under 30 s.
test-quick: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/python -m ruff check smadlrp tests benchmarks
	$(BIN)/python -m mypy smadlrp

docs: install
	$(BIN)/python -m smadlrp.cli.reference docs/cli.md

# Writes only below $(DEMO)/ and ends by printing its headline figures beside the committed ones.
demo: install
	bash scripts/demo.sh $(DEMO)

# Maintainers: rerun the demo with compare-rules' sanity checks (minutes more) and publish its figures
# (docs/demo-figures.json, docs/images/, the quoted blocks).
docs-figures: install
	SMADLRP_DEMO_SANITY=1 bash scripts/demo.sh $(DEMO)
	$(BIN)/python scripts/demo_figures.py $(DEMO) --publish

clean:
	rm -rf $(VENV) $(DEMO) test_results .pytest_cache .mypy_cache .ruff_cache
