# `make run` pretrains the embedded default with ZO; `make test-all` runs every test (what CI runs), `make test`
# the fast lane. Each installs first.
PYTHON ?= python
# accelerate launch without a config runs a CPU process on one thread
THREADS ?= $(shell nproc)

.PHONY: install install-tested run test test-all bench constraints

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]"

# the versions the suite last passed with (constraints.txt), as CI installs them
install-tested:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test]" -c constraints.txt

run: install
	accelerate launch --num_cpu_threads_per_process $(THREADS) recipes/pretrain_zo.py

# the fast lane for an edit-test loop (about 2-3 min on 2 cores): leaves out the end-to-end runs and statistical
# checks marked slow
test: install-tested
	$(PYTHON) -m pytest -q -m "not slow"

# what CI runs (.ci/run): every test
test-all: install-tested
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_zo_step.py

# new package versions: pin them only if the whole suite passes with them
constraints:
	bash .ci/refresh-constraints
