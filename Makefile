# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q
# torch 2.13.0 (CPU build) lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: install demo test test-gpu e2e local-cluster crds clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_CPU)
	$(PIP) -e '.[worker,operator,dev]'
	# text-generation 0.7.0 declares huggingface-hub<1.0, which transformers 5 refuses; the client
	# only needs build_hf_headers, which hub 1.x/2.x still has (a test imports and uses it).
	$(PIP) --no-deps text-generation==0.7.0
	touch $@

demo: install
	$(VENV)/bin/internvl demo

test: install
	$(VENV)/bin/pytest -q

test-gpu: install
	$(VENV)/bin/pytest -q -m gpu

# The end-to-end suite alone: kubectl apply of a fine-tune -> data check -> training -> merge -> serving,
# against the in-process API emulator and process kubelet (or a real cluster: see tests/e2e/README.md).
e2e: install
	$(VENV)/bin/pytest -q -m e2e tests/e2e

# A stand-in cluster for a person: API emulator + process kubelet + the operator; prints the kubectl setup.
local-cluster: install
	$(PY) -m tests.e2e.local_cluster

# Regenerate crds/ from the operator's pydantic models, its README field reference, and the chart's copy.
crds: install
	$(PY) -m internvl_operator.crdgen --docs operator/README.md
	$(PY) charts/sync_crds.py

clean:
	rm -rf $(VENV) .pytest_cache
