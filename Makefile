# connpub: set-up, tests, demo, lint. Every target that needs the host set-up runs it first
# (idempotent: a done step costs one check).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup test demo lint bench clean-host

setup:
	@bash .ci/setup-host

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

demo: setup
	.venv/bin/connpub demo

lint: setup
	.venv/bin/ruff check .

bench: setup
	.venv/bin/connpub bench xdp --json

# Remove every connpub namespace, pin and attachment left on this host (after a crash).
clean-host: setup
	.venv/bin/connpub lab down --all
