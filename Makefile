# Two commands a newcomer needs: `make train` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Where the synthetic default data lives (git-ignored); `make train` writes it when missing.
SYNTHETIC ?= data/synthetic
# Extra Hydra overrides for `make train`, e.g. make train ARGS="model/gate=dselect_k".
ARGS ?=
# Optional index for torch (e.g. https://download.pytorch.org/whl/cu128 for a CUDA build).
TORCH_INDEX ?=

.PHONY: install train test lint data clean

install: $(STAMP)

# The pinned trio: torch 2.13.0 + fbgemm 1.8.0 + torchrec 1.8.0 (see README, "Supported matrix").
# fbgemm-gpu (CUDA) only imports where the NVIDIA driver library is present; elsewhere we take
# fbgemm-gpu-cpu. torchrec goes in with --no-deps because its metadata names fbgemm-gpu; its real
# runtime dependencies are in pyproject.toml.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	if ldconfig -p 2>/dev/null | grep -q libnvidia-ml.so.1; then extra=cuda; else extra=cpu; fi; \
	  echo "installing recsys_moe[$$extra,dev]"; \
	  $(PY) -m pip install -q -e ".[$$extra,dev]"
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -c "import torch, torchrec, fbgemm_gpu, recsys_moe; print('torch', torch.__version__, '| torchrec', torchrec.__version__)"
	# the DSelect-k gate's numba loops, compiled once into their disk cache (model.gate.kernel)
	$(PY) -m recsys_moe.moe.gates.dselect_k_native
	touch $(STAMP)

$(SYNTHETIC)/_SUCCESS: recsys_moe/data/synthetic.py | $(STAMP)
	$(PY) -m recsys_moe.data.synthetic --out $(SYNTHETIC)

data: $(SYNTHETIC)/_SUCCESS

train: $(STAMP) $(SYNTHETIC)/_SUCCESS
	source launch/env.sh && $(PY) -m recsys_moe.train data.path=$(SYNTHETIC) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys_moe tests

clean:
	rm -rf outputs multirun $(SYNTHETIC)
