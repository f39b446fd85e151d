# Set-up and the two jobs of README. Everything installs into .venv from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision must come as a matching pair; this pair installs from this machine's disk.
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
# Product plugins installed with the core; repsim-plugin-example is a template its own test installs.
PLUGINS := $(filter-out plugins/repsim-plugin-example/%,$(wildcard plugins/*/pyproject.toml))

.PHONY: install run test bench clean

$(BIN)/.installed: pyproject.toml $(PLUGINS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet $(TORCH_PAIR)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	for p in $(dir $(PLUGINS)); do $(BIN)/python -m pip install --quiet --no-build-isolation -e $$p || exit 1; done
	touch $@

install: $(BIN)/.installed

# The zoo first, one model per core side by side (a no-op once cached), then the study.
run: $(BIN)/.installed
	$(BIN)/repsim minizoo train
	$(BIN)/repsim run recipes/mini.toml

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_cka.py

clean:
	rm -rf $(VENV) runs
