# Developer and CI entry points; see README.md. `make test` needs root once, to install RabbitMQ.
PYTHON ?= python3
VENV := .venv
PYTEST_ARGS ?=
# The private RabbitMQ of `make run`; AMQP_PORT=0 picks any free port.
AMQP_PORT ?= 5672

.PHONY: venv broker-deps run test lint clean bench

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

# The end-to-end benchmark (tests/bench/run.py): a private RabbitMQ, the bridge and the aio-pika
# baseline under wrk; appends to tests/bench/RESULTS.md. Installs Debian's wrk when missing
# (root), else prints the command. Extra options: make bench BENCH_ARGS="--runs 1 --duration 5".
bench: venv broker-deps
	@command -v wrk >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing wrk with apt-get ..." >&2; \
			apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; \
		else \
			echo "wrk is not installed; as root run: apt-get update && apt-get install -y wrk" >&2; \
			exit 1; \
		fi; }
	$(VENV)/bin/python tests/bench/run.py --write-results $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .run .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
