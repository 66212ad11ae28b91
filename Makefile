# pykvmm: `make demo` and `make test` work on a fresh machine (Python, gcc, binutils).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all setup guests demo test test-all test-nested bench kut clean

all: setup guests

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

setup: $(STAMP)

guests:
	$(MAKE) -s -C guest PYTHON=$(PYTHON)

demo: setup guests
	$(VENV)/bin/pykvmm run

test: setup guests
	$(PY) -m pytest -q

test-all: setup guests
	$(PY) -m pytest -q -m ''

# The suite on mainline KVM (kvm_amd in a QEMU TCG VM; see scripts/nested-kvm.sh). Slow:
# pick a selection with TESTS, e.g. make test-nested TESTS="tests/test_machine.py -k fault".
TESTS ?= tests/
test-nested: setup guests
	scripts/nested-kvm.sh $(TESTS)

bench: setup guests
	$(PY) scripts/bench

# kvm-unit-tests (../shared/kvm-unit-tests or KUT_DIR), every test, beside QEMU/KVM's results
KUT_REFERENCE ?= ../shared/kvm-unit-tests-qemu-kvm.txt
kut: setup
	$(VENV)/bin/pykvmm kut -j 2 $(if $(wildcard $(KUT_REFERENCE)),--compare $(KUT_REFERENCE))

clean:
	$(MAKE) -s -C guest clean
	rm -rf $(VENV) *.egg-info .pytest_cache
