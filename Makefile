# The commands of the README:
#   make book         build the book (executes every notebook on the embedded default model, once:
#                     executions are cached in _build/.jupyter_cache and shared with make test)
#   make check-html   check the built book (scripts/check_html.py): offline, no stderr, links, figures
#   make test         run the whole test suite (unit tests + every notebook, executed through the
#                     book's jupyter-cache with errors raised: conftest.py, scripts/book_exec.py)
#   make screenshots  browser check of the built book (needs Chromium: apt-get install -y chromium)
# All create .venv on first use: CPU torch 2.13.0 first, then the project with its extras.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu makes pip take torch's CPU build from there
# (on Linux, PyPI's torch is the CUDA build); the GitHub workflow sets it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.svtools-installed
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

# Tests and notebooks never touch the model hub by default; the book builds on the embedded model.
# (The GitHub Pages workflow sets both to 0 and SVTOOLS_MODEL=gpt2 to show the paper's models.)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# Idle OpenMP threads spin by default; on a small shared CPU that made small torch ops 10-30 ms
# each (head_sparsity 35-55 s instead of 4-14 s). Results do not depend on it.
export OMP_WAIT_POLICY ?= PASSIVE
# glibc returns large freed blocks to the system and faults them in again for the next tensor: a fresh
# 100 MB tensor op took 39-54 ms here against 15 ms in reused memory (benchmarks/page_faults.py). Keep
# freed memory for reuse (scripts/book_exec.py sets the same for the kernels). Results do not depend on it.
export MALLOC_MMAP_THRESHOLD_ ?= 4294967296
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296

.PHONY: book check-html screenshots test env benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[book,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

env: $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	@echo "The book is in _build/html/index.html"

check-html:
	$(BIN)/python scripts/check_html.py

screenshots:
	$(BIN)/python scripts/screenshots.py

test: $(STAMP)
	$(BIN)/python -m pytest tests book -p no:cacheprovider

# Benchmarks print ratios measured side by side; OMP_WAIT_POLICY=PASSIVE keeps idle OpenMP threads
# from spinning on a shared machine (they made every small op 10-30 ms slower under load).
benchmark: $(STAMP)
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python qk_svd.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python rotary_qk_svd.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python head_sparsity_vs_forward.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python prompts_exponent.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python head_sparsity_rotary.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python ioi_lm_step.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python toy_step.py
	cd benchmarks && OMP_WAIT_POLICY=PASSIVE ../$(BIN)/python page_faults.py

clean:
	rm -rf _build
