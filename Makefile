# `make run` pretrains the embedded default with ZO; `make test` runs the test suite. Both install first.
PYTHON ?= python
# accelerate launch without a config runs a CPU process on one thread
THREADS ?= $(shell nproc)

.PHONY: install run test bench

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

run: install
	accelerate launch --num_cpu_threads_per_process $(THREADS) recipes/pretrain_zo.py

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_zo_step.py
