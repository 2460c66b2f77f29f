# Two commands: `make demo` and `make test`. Both create .venv and install what they need.
PY := .venv/bin/python
# Data: $CERTTUNE_DATA, else ../shared/data where it exists, else ./data (a first search downloads MNIST there).
DATA ?= $(if $(CERTTUNE_DATA),$(CERTTUNE_DATA),$(if $(wildcard ../shared/data),../shared/data,./data))

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: .venv/.installed

# Two test processes (pytest-xdist), one per core of the 2-core machine the suite is sized for; a test file stays in
# one process (its module fixtures are built once). The tests share nothing: each Ray instance has its own temp dir
# and free ports, and none runs `ray stop` (docs/decisions.md "Two test processes"). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest tests --durations=25 -n $(TEST_WORKERS) --dist loadfile

# A real search on real MNIST with the local defaults (local Ray, TPE, warmup-aware ASHA): 12 small trials.
DEMO := demo-$(shell date +%Y%m%d-%H%M%S)
demo: install
	.venv/bin/certtune search search_spaces/mnist_tiny.yaml --name $(DEMO) --num-samples 12 --max-concurrent 2 \
	    --resources-per-trial cpu=1 --data-dir $(DATA) --storage $(CURDIR)/runs/search
	.venv/bin/certtune report $(DEMO) --storage $(CURDIR)/runs/search
	.venv/bin/certtune export $(DEMO) --storage $(CURDIR)/runs/search --out runs/$(DEMO)-export
	@echo "best config: runs/$(DEMO)-export/best.yaml  (rerun: .venv/bin/certtune train runs/$(DEMO)-export/best.yaml --data-dir $(DATA))"

.PHONY: install test demo
