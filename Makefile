# Two commands do everything on a fresh machine with only Python 3.11:
#   make run   - set up .venv if missing, run the embedded default until Ctrl-C
#   make test  - set up .venv if missing, run the whole test suite
#   make fuzz  - the property tests with many more examples, exploring afresh (~5 min; more when loaded)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test fuzz bench check clean

$(PY):
	@test -n "$(PYTHON)" || { echo "need Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "$(PYTHON) is older than 3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	-$(PY) -m vbatt.drivers.mqtt.broker  # Mosquitto for the MQTT tests: found, or unpacked from its Debian package (says why not)
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/vbatt run $(ARGS)

# TEST_WORKERS=4 runs the suite in 4 parallel workers (pytest-xdist; a test file stays in one worker, so
# module fixtures are built once; each worker has ports of its own, tests/conftest.py): ~10 min instead
# of ~13-15 on 2 cores. Not the default yet: the workers' own load peaks (~28 on 2 cores, process trees
# beside the soak) still fail a timing-bound test now and then (README "Tests"). 0: one process.
TEST_WORKERS ?= 0
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(ARGS)

# The hypothesis properties under the "fuzz" profile (tests/conftest.py): FUZZ_EXAMPLES per property
# (slow network properties take a share of it), no example database, so every run explores afresh as a
# fresh clone does. Run it before resolving anything a property test found.
FUZZ_EXAMPLES ?= 3000
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz VBATT_FUZZ_PROFILE_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -p no:cacheprovider \
		--hypothesis-show-statistics tests/test_allocation.py tests/test_fuzz_config.py tests/test_fuzz_modbus.py $(ARGS)

# The whole benchmark suite, then benchmarks/REPORT.md with tables and plots (kept in git, so that
# a change that makes anything slower shows in review). The report is written even if a benchmark fails.
bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-json=benchmarks/results.json $(ARGS); \
	status=$$?; $(PY) -m benchmarks.report || status=1; exit $$status

check: $(STAMP)
	$(VENV)/bin/vbatt check $(or $(CONFIG),runtime/default.yaml)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
