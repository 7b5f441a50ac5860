# The two commands: `make demo` (train → export → run → compare, on the CPU) and `make test`.
# Both install what they need into .venv first (scripts/install.sh).
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.ferry-installed

.PHONY: demo test lint gpu-check

demo: $(STAMP)
	$(VENV)/bin/ferry demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $@
