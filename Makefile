# Two commands set everything up on a fresh machine with Python 3.11 and make:
#   make demo   build the demo MoE model into engines/demo/
#   make test   run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[torch,bench,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lynx-export demo-model engines/demo-source/model.onnx
	$(BIN)/lynx-export inspect engines/demo-source/model.onnx
	$(BIN)/lynx-export build engines/demo-source/model.onnx -o engines/demo --force

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) engines/demo engines/demo-source .pytest_cache
