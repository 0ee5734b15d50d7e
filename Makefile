# Quickstart: `make demo` trains the smoke recipe, `make test` runs the tests. Both install first.
# Inside an active virtualenv that one is used; otherwise .venv is created here.
ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := .venv/bin/python
endif

.PHONY: install demo test bench clean

install:
ifndef VIRTUAL_ENV
	@test -x .venv/bin/python || python3 -m venv .venv
endif
	$(PYTHON) -m pip install --quiet -e '.[dev]'

demo: install
	$(PYTHON) -m resnet50_recipe train smoke --output runs/smoke --no-resume --force

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/step_overhead.py

clean:
	rm -rf runs build *.egg-info
