# impact: `make book` builds the reproduction, `make test` runs the tests.
# Each target does its own set-up on a fresh machine (virtual environment, kernel, data).
PRESET ?= default
# processes that compute the levels' pieces and run the chapters side by side, one CPU thread each
# (impact_core/schedule.py); the numbers do not depend on it
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PORT ?= 8000
OUT ?= .
VENV := .venv
PY := $(VENV)/bin/python
ifdef DATA_DIR
export IMPACT_DATA_ROOT := $(DATA_DIR)
endif
DATA_DIR ?= /usr/share/datasets/fashion-mnist
export TQDM_MININTERVAL ?= 10
export PYTHONHASHSEED = 0

.PHONY: book test test-quick bench serve setup data browser clean-cache clean

setup: $(VENV)/.installed data

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps foolbox==3.3.4  # only for its 20 ImageNet photos (paper-shaped test)
	$(PY) -m ipykernel install --sys-prefix --name impact --display-name "impact (.venv)" >/dev/null
	touch $@

data:
	@if [ -f "$(DATA_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(DATA_DIR)/train-images-idx3-ubyte" ]; then \
	  echo "Fashion-MNIST found in $(DATA_DIR)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST is missing from $(DATA_DIR). Install it with 'sudo apt-get install dataset-fashion-mnist'," >&2; \
	  echo "or download the four IDX files and run with DATA_DIR=/path/to/folder (sets data.root)." >&2; \
	  exit 1; \
	fi

book: setup
	$(PY) -m impact_core book --preset $(PRESET) --jobs $(JOBS) --out $(OUT)

# Debian's Chromium and its driver, for the browser test of the built book.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
	  echo "chromium and chromedriver found"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -qq chromium chromium-driver || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)); \
	else \
	  echo "chromium / chromium-driver missing: the browser test will be skipped (sudo apt-get install chromium chromium-driver)" >&2; \
	fi

# Every test, the paper-shaped run of every chapter on DeiT-III B/16 included (marked slow).
test: setup browser
	$(PY) -m pytest -q tests

# The same without the slow paper-shaped test (a few minutes shorter), while working.
test-quick: setup browser
	$(PY) -m pytest -q -m "not slow" tests

bench: setup
	$(PY) -m impact_core bench

serve:
	@echo "serving $(OUT)/_build/html on http://127.0.0.1:$(PORT)"
	$(PY) -m http.server --bind 127.0.0.1 --directory $(OUT)/_build/html $(PORT)

clean-cache:
	rm -rf .cache/impact

clean:
	rm -rf $(OUT)/_build
