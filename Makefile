# wsgistack: the two commands an operator needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONFIG ?= stack.yaml

.PHONY: serve test test-lowest check bench fuzz soak clean install install-dev

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-dev pyproject.toml
	$(PIP) install -q -e '.[dev,bench]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# Per-machine secrets for the default stack, made once, never committed (.env is git-ignored);
# serve.py reads the .env beside the configuration it serves.
ENV_FILE := $(dir $(CONFIG)).env

# Python writes it whole, 0600 whatever the umask, and only if it is not there (O_EXCL): a failed run
# leaves no empty .env behind, which make would take as made.
$(ENV_FILE):
	@$(PYTHON) -c "import os, secrets, sys; text = ''.join(n + '=' + secrets.token_urlsafe(32) + '\n' for n in ('SESSION_SECRET', 'JWT_SECRET')); fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600); os.write(fd, text.encode()); os.close(fd)" '$@'
	@echo "created $@ with random SESSION_SECRET and JWT_SECRET"

serve: $(VENV)/.installed $(ENV_FILE)
	$(PY) serve.py -c $(CONFIG) serve

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite against the oldest release each dependency's lower bound admits, in a venv of its own: a
# bound below what the code needs fails here rather than on an operator's machine.
LOWEST ?= .venv-lowest
test-lowest:
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(PYTHON) -c "import re, sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; sys.stdout.write(''.join(re.sub(r'\\[.*?\\]', '', d.split(',')[0]).replace('>=', '==') + '\\n' for d in deps))" > $(LOWEST)/lowest.txt
	$(LOWEST)/bin/pip install -q -c $(LOWEST)/lowest.txt -e '.[dev]'
	$(LOWEST)/bin/python -m pytest $(PYTEST_ARGS)

check: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(VENV)/.installed-bench
	$(PY) -m bench

fuzz: $(VENV)/.installed-dev
	WSGISTACK_FUZZ_EXAMPLES=20000 $(PY) -m pytest tests/test_fuzz.py -p no:cacheprovider

soak: $(VENV)/.installed-dev
	$(PY) tests/soak.py $(SOAK_ARGS)

# What the build and the tools made; not var/ (the users database) nor .env (this machine's secrets).
clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
