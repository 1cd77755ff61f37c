# The two commands of README.md: `make demo` and `make test`. Both set up .venv first (tools/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench
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
