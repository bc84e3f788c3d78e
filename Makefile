# fastconn developer targets. `make setup` once, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup build test test-rust test-python test-slow lint lint-python lint-rust bench bench-quick bench-readme demo clean

setup:
	./scripts/setup.sh

# Rebuild the extension after Rust changes (release profile).
build:
	$(VENV)/bin/pip install -q --no-deps -e .

# CI runs `make test`: the slow fault tests are part of it (they add well under a minute; see
# test-slow).
test: build lint test-rust test-python test-slow

test-rust:
	cargo test --workspace --exclude fastconn-py -q

# The default set: everything but the tests marked slow (pyproject's addopts leave them out).
test-python: build
	$(PY) -m pytest -q

# Fault tests that kill and restart real brokers (tests marked @pytest.mark.slow).
test-slow: build
	$(PY) -m pytest -q -m slow

lint: lint-python lint-rust

lint-python:
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy
	$(PY) -m mypy.stubtest fastconn._core

lint-rust:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings

bench:
	$(PY) -m fastconn bench

bench-quick:
	$(PY) -m fastconn bench --quick

# Writes the last run's table into the README (between its BENCH-TABLE markers).
bench-readme:
	$(PY) benches/report.py bench-results/results.json --readme README.md

demo:
	$(PY) -m fastconn demo

clean:
	rm -rf target dist .pytest_cache .mypy_cache
