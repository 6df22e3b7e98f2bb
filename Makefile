# Developer and CI entry points; see README.md. `make test` needs root once, to install RabbitMQ.
PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=
# The private RabbitMQ of `make run`; AMQP_PORT=0 picks any free port.
AMQP_PORT ?= 5672

.PHONY: venv broker-deps run test lint clean

venv: $(VENV)/.installed

# The stamp makes `pip install` re-run only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Installs Debian's rabbitmq-server when missing (root), else prints the command to run.
broker-deps:
	@test -x /usr/lib/rabbitmq/bin/rabbitmq-server || $(PYTHON) -m bridge.devbroker install

run: venv broker-deps
	$(VENV)/bin/python -m bridge.devbroker run --dir .run/rabbitmq --port $(AMQP_PORT) -- \
		$(VENV)/bin/one-bridge run --config config/bridge.dev.toml

test: venv broker-deps
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check bridge tests
	$(VENV)/bin/mypy --strict bridge

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
