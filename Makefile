# The two commands of the README:
#   make book   build the book (executes every notebook on the embedded default model)
#   make test   run the whole test suite (unit tests + every notebook through nbmake)
# Both create .venv on first use: CPU torch 2.13.0 first, then the project with its extras.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.svtools-installed

# Tests and notebooks never touch the model hub; the book builds on the embedded model.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: book test env benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

env: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book is in _build/html/index.html"

test: $(STAMP)
	$(BIN)/python -m pytest tests book --nbmake --nbmake-timeout=900 -p no:cacheprovider

# Benchmarks print ratios measured side by side; OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads
# from spinning on a shared machine (they made every small op 10-30 ms slower under load).
benchmark: $(STAMP)
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python qk_svd.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python rotary_qk_svd.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python head_sparsity_vs_forward.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python prompts_exponent.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python head_sparsity_rotary.py

clean:
	rm -rf _build
