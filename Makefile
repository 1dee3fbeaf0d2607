# Set-up is idempotent: `make run` and `make test` create the virtual environment on first use.
# CPU machines (and CI) get the lean torch 2.13.0 CPU wheel; on a GPU machine use
#   make run TORCH=torch        (the normal CUDA build from PyPI)
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PRESET ?= tiny
BUDGET ?= minutes
OUT    ?= runs/$(PRESET)$(if $(filter steps,$(BUDGET)),-steps,)
BIN     = $(VENV)/bin

.PHONY: venv run test test-fast bench browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[all]"
	touch $@

# The main job: the whole pipeline on the embedded Shakespeare corpus. BUDGET=steps trains every stage on a
# fixed amount of work (the same assistant on any machine) instead of fixed minutes.
run: venv
	$(BIN)/gptstack pipeline --preset $(PRESET) --budget $(BUDGET) --out $(OUT)

# The test suite (the report test drives a real headless Chromium, installed here if missing).
test: venv browser
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "note: install Debian's chromium for the report browser test (sudo apt-get install chromium)"; fi; }

bench: venv
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(VENV) .cache/test-home
