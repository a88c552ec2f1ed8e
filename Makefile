# The README's two commands: `make demo` and `make test`. Each creates the
# virtual environment it needs on a fresh machine with only Python installed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Tests that must pass on every Keras backend, not only TensorFlow.
MULTI_BACKEND_TESTS := tests/test_ops.py tests/test_layers.py tests/test_callbacks.py tests/test_schedules.py tests/test_lr_finder.py
# Model surgery and analysis, checked against each backend's own autodiff.
SURGERY_TESTS := tests/test_graph.py tests/test_rewrite.py tests/test_real_models.py tests/test_graph_properties.py tests/test_freeze.py
# The per-variable oracle: measured updates against the reports, TensorFlow and JAX.
PER_VARIABLE_TESTS := tests/test_per_variable.py

.PHONY: demo test lint typecheck pytest docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# One stamp per set of extras: reinstall when pyproject.toml changes.
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[tensorflow,examples]"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[tensorflow,dev,docs,examples,backends]"
	touch $@

# Writes build/demo/finetune_digits.png; TF_CPP_MIN_LOG_LEVEL=3 hides
# TensorFlow's C++ start-up log.
demo: $(VENV)/.demo-installed
	TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=tensorflow $(BIN)/python examples/finetune_digits.py

test: lint typecheck pytest docs

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy stopgrad_lr

# pytest exits 5 when it collects no test; make treats that as a failure.
pytest: $(VENV)/.test-installed
	KERAS_BACKEND=tensorflow $(BIN)/python -m pytest
	KERAS_BACKEND=jax $(BIN)/python -m pytest $(MULTI_BACKEND_TESTS) $(SURGERY_TESTS) $(PER_VARIABLE_TESTS)
	KERAS_BACKEND=torch $(BIN)/python -m pytest $(MULTI_BACKEND_TESTS) $(SURGERY_TESTS)

docs: $(VENV)/.test-installed
	$(BIN)/mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) build site
