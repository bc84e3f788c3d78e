# fastconn developer targets. `make setup` once, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup build test test-rust test-python lint lint-python lint-rust bench bench-quick bench-readme demo clean

setup:
	./scripts/setup.sh

# Rebuild the extension after Rust changes (release profile).
build:
	$(VENV)/bin/pip install -q --no-deps -e .

test: build lint test-rust test-python

test-rust:
	cargo test --workspace --exclude fastconn-py -q

test-python: build
	$(PY) -m pytest -q

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
