# Set-up and the two everyday commands. The virtual environment is created once and reused;
# torch is installed first, pinned, so pip keeps that build (a CPU wheel that lies on this kind of
# machine's disk) instead of resolving a multi-GB CUDA wheel. Override TORCH for another build.
# DeepSpeed ships as source whose setup imports torch: it is built against the torch already in
# the venv (--no-build-isolation), or pip would fetch a second, CUDA torch to build it with.
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet --no-build-isolation "deepspeed>=0.16"
	$(BIN)/pip install --quiet -e ".[dev,deepspeed]"
	$(BIN)/pip install --quiet --no-deps "liger-kernel==0.8.5"  # its chunked losses need no Triton (pyproject)
	touch $@

demo: $(BIN)/.installed
	$(BIN)/dts-llm quickstart --output quickstart_output

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check dts_llm eval tests benchmarks
	$(BIN)/ruff format --check dts_llm eval tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/kd_loss.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/teacher_cache.py
	$(BIN)/python benchmarks/on_policy.py
	$(BIN)/python benchmarks/fused_head.py

clean:
	rm -rf $(VENV) demo_output quickstart_output
