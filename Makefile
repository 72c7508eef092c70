# Two entry points for a fresh machine:  `make demo`  and  `make test`.
# `make demo` installs only what the demo needs: DCMTK (apt-get) and the runtime Python
# packages into .venv. `make test` installs the whole test toolchain (apt-get: DCMTK,
# Orthanc, PostgreSQL, dicom3tools, Chromium, promtool, kubectl, shellcheck) and `.[dev]`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck unit bench system-deps demo-deps venv venv-runtime clean

## demo: hub + agent + reference models + sample studies end to end (DEMO_ARGS=--serve keeps it up)
demo: demo-deps venv-runtime
	@echo "==> running the demo (examples/demo.py $(DEMO_ARGS))"
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

## test: lint, type-check and the whole test suite (real DCMTK peers, fault injection)
test: system-deps venv lint typecheck
	@REQUIRE_DCMTK=1 $(BIN)/python -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure" >&2; exit 1; fi; \
	exit $$rc

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

## bench: ingest throughput, agent vs DCMTK storescp (see README "Benchmarks")
bench: system-deps venv
	$(BIN)/python bench/ingest.py

## demo-deps: DCMTK only (storescu, echoscu, storescp), what the demo runs
demo-deps:
	@echo "==> checking DCMTK (storescu, echoscu, storescp)"
	@command -v storescu >/dev/null && command -v echoscu >/dev/null \
	  && command -v storescp >/dev/null || { \
	  echo "==> installing dcmtk (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends dcmtk; }

system-deps:
	@missing=""; \
	command -v storescu >/dev/null && command -v echoscu >/dev/null \
	  && command -v storescp >/dev/null || missing="$$missing dcmtk"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v dciodvfy >/dev/null || missing="$$missing dicom3tools"; \
	command -v Orthanc >/dev/null || missing="$$missing orthanc"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v kubectl >/dev/null || missing="$$missing kubernetes-client"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt-get)"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $$missing || exit 1; \
	  case "$$missing" in *prometheus*) \
	    { $(SUDO) systemctl disable --now prometheus >/dev/null 2>&1; \
	      $(SUDO) service prometheus stop >/dev/null 2>&1; true; } ;; esac; \
	  case "$$missing" in *orthanc*) \
	    { $(SUDO) systemctl disable --now orthanc >/dev/null 2>&1; \
	      $(SUDO) service orthanc stop >/dev/null 2>&1; true; } ;; esac; \
	fi

venv: $(STAMP)

# the runtime packages only (what the demo needs); a full dev install satisfies it too
venv-runtime: $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml
	@echo "==> creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(BIN)/python -m pip install --upgrade pip
	@echo "==> installing the agent and hub with their runtime packages (pip shows each one)"
	$(BIN)/python -m pip install -e .
	touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP) $(RUNTIME_STAMP)

clean:
	rm -rf $(VENV) demo-run .mypy_cache .ruff_cache .pytest_cache
