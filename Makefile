# `make run` pretrains the embedded default with ZO; `make test` runs the test suite. Both install first.
PYTHON ?= python
# accelerate launch without a config runs a CPU process on one thread
THREADS ?= $(shell nproc)

.PHONY: install install-tested run test test-fast bench constraints

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

# the versions the suite last passed with (constraints.txt), as CI installs them
install-tested:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]" -c constraints.txt

run: install
	accelerate launch --num_cpu_threads_per_process $(THREADS) recipes/pretrain_zo.py

# what CI runs: every test
test: install-tested
	$(PYTHON) -m pytest -q

# the lane for a quick edit-test loop: leaves out the end-to-end runs marked slow
test-fast: install-tested
	$(PYTHON) -m pytest -q -m "not slow"

bench: install
	$(PYTHON) benchmarks/bench_zo_step.py

# new package versions: pin them only if the whole suite passes with them
constraints:
	bash .ci/refresh-constraints
