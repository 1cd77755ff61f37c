# The two commands of README.md: `make demo` and `make test`. Both set up .venv first (tools/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench gpu-check
install: $(VENV)/.installed

$(VENV)/.installed: setup.py tools/install.sh tools/constraints.txt
	bash tools/install.sh $(VENV)
	touch $@

# The whole pipeline on CPU: a sweep over D = 4, 64, 1024 (data + training), every checkpoint evaluated, the Bayes
# predictors on the same sequences, collation into metrics.h5, the normative fit and the figures.
demo: install
	$(PY) -m normscale.train -m experiment=demo logging.wandb=false
	$(PY) -m normscale.eval experiment=demo
	$(PY) -m normscale.eval -m experiment=demo model=bayes model_kwargs.kind=memorizing,generalizing
	$(PY) -m normscale.collate experiment=demo
	$(PY) -m normscale.analysis experiment=demo

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) bench/bench_bayes.py
	$(PY) bench/bench_shards.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_eval.py
	$(PY) bench/bench_llm.py
	$(PY) bench/bench_integrity.py

# The GPU check (bench/gpu_check.py; its summary becomes docs/GPU.md): one GPU, no network, no `make install`. The
# modules a bare GPU machine lacks (hydra, omegaconf, submitit, mup) are installed first, offline, from the wheels in
# WHEELS. QUICK=1: the CPU mode (tiny sizes, about a minute; the summary stays in OUT).
OUT ?= gpu-check-out
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
WHEELS ?= $(firstword $(wildcard shared/device-wheels ../shared/device-wheels))

gpu-check:
	@$(GPU_PY) -c "import hydra, omegaconf, submitit, mup" 2>/dev/null || { \
	  test -n "$(WHEELS)" || { echo "gpu-check: modules are missing and no wheels were found: set WHEELS=DIR"; exit 2; }; \
	  echo "gpu-check: installing $(WHEELS)/*.whl (offline)"; \
	  $(GPU_PY) -m pip install --quiet --no-deps --no-index $(WHEELS)/*.whl; }
	PYTHONPATH=$(CURDIR) $(GPU_PY) bench/gpu_check.py --out $(OUT) $(if $(QUICK),--quick)
