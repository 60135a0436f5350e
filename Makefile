# `make demo` and `make test` each create or update .venv themselves, so both work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that lies on the CPU machines' disk (an unpinned torch downloads a CUDA build).
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,hf]" "$(TORCH)"
	touch $(STAMP)

venv: $(STAMP)

# The main job on the embedded default: built-in corpus, a tiny GPT, 2 minutes on the CPU.
demo: $(STAMP)
	$(BIN)/underpar data prepare --source builtin --vocab 1024
	$(BIN)/underpar eval bpb --model unigram
	$(BIN)/underpar pretrain --preset tiny-cpu

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
