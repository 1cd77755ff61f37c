# The two commands of README.md: `make demo` and `make test`. Both set up .venv first (tools/install.sh).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench
install: $(VENV)/.installed

$(VENV)/.installed: setup.py tools/install.sh
	bash tools/install.sh $(VENV)
	touch $@

demo: install
	$(PY) -m normscale.train experiment=demo logging.wandb=false

test: install
	$(PY) -m pytest tests

bench: install
	$(PY) bench/bench_bayes.py
	$(PY) bench/bench_shards.py
	$(PY) bench/bench_train.py
