# convshard: `make train` trains the default model, `make test` runs the suite.
# Both create .venv when missing; torch is pinned first so that the project's
# `torch>=` requirement is already met by the CPU wheel.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0

.PHONY: install train test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# the multi-host tests build network namespaces with iproute2 (ip, tc); they skip without it
	@command -v ip >/dev/null && command -v tc >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; } || \
	  echo "iproute2 not installed: the multi-host tests will skip"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

train: install
	$(VENV)/bin/convshard train

# pytest exits 5 when it collects no test: that is a failure too.
test: install
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: no tests collected" >&2; exit 1; fi; exit $$status

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
