# Quickstart: `make demo` trains the smoke recipe, `make test` runs the tests. Both install first.
# Inside an active virtualenv that one is used; otherwise .venv is created here.
ifdef VIRTUAL_ENV
PYTHON := python
else
PYTHON := .venv/bin/python
endif

.PHONY: install demo test test-fast journey bench clean

install:
ifndef VIRTUAL_ENV
	@test -x .venv/bin/python || python3 -m venv .venv
endif
	$(PYTHON) -m pip install --quiet -e '.[dev]'

demo: install
	$(PYTHON) -m resnet50_recipe train smoke --output runs/smoke --no-resume --force

test: install
	$(PYTHON) -m pytest -q -m "not journey"

# The fast tier: every module of the package in under 3 minutes on 2 CPU cores, for the edit-test loop. It leaves
# out the tests marked slow (tests/conftest.py says which and why); `make test` runs everything.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not gpu and not journey"

# The journey as one piece (tests/test_journey.py): `aws launch` to weights on the Hub through the instance's user
# data, its systemd unit, the trainer, S3 and the release, on moto and stand-ins; one line per scenario at the end.
# Needs the AWS CLI and systemd-analyze (.ci/run installs them from Debian). About 4 minutes on 2 cores.
journey: install
	$(PYTHON) -m pytest -q -m journey tests/test_journey.py

# The CPU rows of BENCHMARKS.md's step table: our step against a bare loop, ResNet-18 and ResNet-50 at 64 px.
bench: install
	$(PYTHON) -m resnet50_recipe bench step --device cpu --model resnet18 --img-size 64 --batch-size 32 --trials 11
	$(PYTHON) -m resnet50_recipe bench step --device cpu --model resnet50 --img-size 64 --batch-size 16 --steps 10 --trials 11

clean:
	rm -rf runs build *.egg-info
