# The two commands of the README. Each creates .venv and installs the project on first use,
# with the exact versions of constraints.txt (see "Reproducible installs" in the README).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
LOCK := constraints.txt

.PHONY: demo test clean lock

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) --upgrade pip setuptools
	$(VENV)/bin/python -m pip install --quiet -c $(LOCK) --build-constraint $(LOCK) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/flowactors demo

test: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

# Resolve the newest versions that pyproject.toml allows, in a scratch environment, and write
# them to constraints.txt. Run `make test` afterwards and commit the lock only if it passes.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip setuptools
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	{ echo "# The exact versions \`make test\` last passed with. Refresh: make lock && make test."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v '^wheel=='; } > $(LOCK)
	rm -rf .lock-venv

# Also the demo's logs (flow.db, flow-2.db, ... with their -wal, -shm, .lock, .token) and the
# report it suggests writing.
clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .import_linter_cache
	rm -f flow.db flow.db-* flow.db.* flow-[0-9]*.db flow-[0-9]*.db-* flow-[0-9]*.db.* report.html
