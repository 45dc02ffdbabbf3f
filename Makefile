# llmbatch: local stack without Docker. Every target is idempotent.
.PHONY: setup up down status demo test test-unit test-faults down-faults bench bench-quick clean

PY := .venv/bin/python

setup:
	@bash infra/setup.sh

up: setup
	@bash infra/stack.sh up

down:
	@bash infra/stack.sh down

# each process's state, pid, uptime and restarts (the supervisor restarts what dies)
status:
	@bash infra/stack.sh status

demo: up
	@bash infra/demo.sh

test: up
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=25 --ignore=tests/faults
	@$(MAKE) --no-print-directory test-faults

# Fault injection kills and restarts processes, so it gets a stack of its own
# (shifted ports, own var dir), with short batch leases so a killed worker's
# batch comes back in seconds, and a dead worker's budget holds expire in 45 s, not 3 minutes (still
# well after its batch is taken back and its cut-off calls counted), so a job that a kill leaves at
# its cap pauses within a minute; the stack is stopped afterwards, pass or fail.
# Ports above the kernel's ephemeral range (32768-60999), so a client socket never holds one.
FAULT_OFFSET ?= 5700
FAULT_ENV := LLMBATCH_PORT_OFFSET=$(FAULT_OFFSET) LLMBATCH_VAR_DIR=$(CURDIR)/var/stack-faults \
	LLMBATCH_BATCH_LEASE_S=10 LLMBATCH_SWEEP_AFTER_S=5 LLMBATCH_FAULTS=1 \
	LLMBATCH_PROVIDER_TIMEOUT_S=20 LLMBATCH_BUDGET_RESERVATION_MARGIN_S=25 LLMBATCH_BUDGET_RESERVATION_TTL_S=45

test-faults: setup
	@$(FAULT_ENV) bash infra/stack.sh up
	@rm -f var/stack-faults/fault-report.jsonl; \
	$(FAULT_ENV) LLMBATCH_FAULT_REPORT=$(CURDIR)/var/stack-faults/fault-report.jsonl \
		$(PY) -m pytest tests/faults -q -p no:cacheprovider --durations=10; rc=$$?; \
	$(FAULT_ENV) bash infra/stack.sh down >/dev/null; exit $$rc

# the fault stack, should a run have been interrupted before it stopped it
down-faults:
	@$(FAULT_ENV) bash infra/stack.sh down

test-unit: setup
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

# All benchmarks, side by side with a plain asyncio client (bench/README.md); < 10 min.
bench: up
	cd bench && ../$(PY) run_all.py

bench-quick: up
	cd bench && ../$(PY) run_all.py --quick

clean: down
	rm -rf var
