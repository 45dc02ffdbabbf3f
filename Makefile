# llmbatch: local stack without Docker. Every target is idempotent.
.PHONY: setup up down status demo test test-unit bench clean

PY := .venv/bin/python

setup:
	@bash infra/setup.sh

up: setup
	@bash infra/stack.sh up

down:
	@bash infra/stack.sh down

status:
	@bash infra/stack.sh status

demo: up
	@bash infra/demo.sh

test: up
	$(PY) -m pytest tests -q -p no:cacheprovider

test-unit: setup
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

bench: up
	$(PY) bench/e2e.py --requests 5000

clean: down
	rm -rf var
