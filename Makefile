# Two commands: `make demo` and `make test`. Both create .venv and install what they need.
PY := .venv/bin/python
DATA ?= $(if $(CERTTUNE_DATA),$(CERTTUNE_DATA),../shared/data)

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: .venv/.installed

test: install
	$(PY) -m pytest tests

demo: install
	.venv/bin/certtune train configs/mnist_small.yaml --data-dir $(DATA) --out runs/demo

.PHONY: install test demo
