# One line per target. `make demo` and `make test` create the pinned environment when it is missing.
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell cat requirements.txt requirements-nodeps.txt | sha256sum | cut -c1-12)
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_SILENT=true

.PHONY: install demo test test-slow test-gpu table1 table2 table3 reuse projection sd3 sd2 sd2_tiny tables status clean-venv

install: $(STAMP)

# The venv is keyed by a hash of the requirement files: a changed pin always reinstalls.
$(STAMP): requirements.txt requirements-nodeps.txt
	rm -rf .venv && python3 -m venv .venv && $(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(OFFLINE) WANDB_MODE=offline $(PY) scripts/demo.py

test: $(STAMP)
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q

test-slow: $(STAMP)
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -m gpu

table1 table2 table3 reuse projection sd3 sd2 sd2_tiny: $(STAMP)
	$(PY) scripts/make_table.py table=$@

tables: $(STAMP)
	$(PY) scripts/make_table.py table=all

status: $(STAMP)
	$(PY) scripts/status.py $(if $(EXP),experiment=$(EXP))

clean-venv:
	rm -rf .venv
