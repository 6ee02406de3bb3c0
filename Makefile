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

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	rm -rf $(DEMO_OUT)
	$(BIN)/havir synth-nsd $(DEMO_OUT)/nsd --subjects 1 --images 200 --seed 0
	$(BIN)/havir masks build --nsd-root $(DEMO_OUT)/nsd --subject 1 --out $(DEMO_OUT)/masks
	$(BIN)/havir masks show --nsd-root $(DEMO_OUT)/nsd --subject 1 --out $(DEMO_OUT)/masks/subj01.png
	$(BIN)/havir prepare --nsd-root $(DEMO_OUT)/nsd --subject 1 --out $(DEMO_OUT)/data
	$(BIN)/havir features --data $(DEMO_OUT)/data --subject 1 --vd demo
	printf 'preset = "tiny"\nepochs = 20\nbatch_size = 32\nlearning_rate = 1e-3\n' > $(DEMO_OUT)/train.toml
	$(BIN)/havir train --data $(DEMO_OUT)/data --subject 1 --out $(DEMO_OUT)/run --config $(DEMO_OUT)/train.toml
	$(BIN)/havir train --data $(DEMO_OUT)/data --subject 1 --out $(DEMO_OUT)/ridge --config $(DEMO_OUT)/train.toml --model ridge
	$(BIN)/havir reconstruct --run $(DEMO_OUT)/run --out $(DEMO_OUT)/recon/structural --mode structural
	$(BIN)/havir reconstruct --run $(DEMO_OUT)/run --out $(DEMO_OUT)/recon/fused --mode fused --steps 20

bench: setup
	$(BIN)/python bench/bench_prepare.py
	$(BIN)/python bench/bench_features.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_reconstruct.py

clean:
	rm -rf $(VENV) $(DEMO_OUT)
