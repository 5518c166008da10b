# `make run` pretrains the embedded default with ZO; `make test` runs the test suite. Both install first.
PYTHON ?= python

.PHONY: install run test bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

run: install
	accelerate launch recipes/pretrain_zo.py

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_zo_step.py
