# `make demo` and `make test` set up their own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: setup test demo bench clean

setup: $(VENV)/.installed

# torch==2.13.0 first: it is the CPU wheel on disk; constraints.txt then keeps every other
# package from pulling a different (CUDA) torch.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# The import contracts (pyproject.toml, [tool.importlinter]) first: stages never import each other.
test: setup
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/havir demo --out $(DEMO_OUT)

bench: setup
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_reconstruct.py
	$(BIN)/python bench/bench_encode.py --size smoke
	$(BIN)/python bench/bench_inflate.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/summary.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
