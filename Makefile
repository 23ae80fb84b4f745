# The two set-up commands of README.md. Each makes (or reuses) the project's virtualenv.
#   make demo   install facelake and run the whole flow on the bundled sample
#   make test   install facelake with its test extras and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Faces weights live inside the repo's folder by default, so nothing is written to $HOME.
export DEEPFACE_HOME ?= $(CURDIR)/.deepface-home
export DEEPFACE_BACKEND_ENGINE = onnx
export RAY_USAGE_STATS_ENABLED = 0

.PHONY: demo test install install-test install-gpu bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# GPU nodes: faiss-gpu and onnxruntime-gpu install the same modules as their CPU
# wheels, so the CPU wheels are removed first.
install-gpu: $(VENV)/.installed
	$(BIN)/pip uninstall --yes faiss-cpu onnxruntime
	$(BIN)/pip install --quiet -e '.[gpu]'

demo: $(VENV)/.installed
	$(BIN)/facelake weights
	$(BIN)/facelake demo --out demo-out

# whole test files on TEST_WORKERS pytest-xdist workers (tests/conftest.py starts the longest first)
TEST_WORKERS ?= 3
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(VENV)/.installed-test
	$(BIN)/python bench/index.py
	$(BIN)/python bench/search.py

clean:
	rm -rf demo-out .deepface-home
