# The two commands of the README quickstart: `make demo` and `make test`.
# Both create .venv on first use; `make test` also installs the real client libraries under test
# (Go and Debian packages via apt-get, Node packages via npm from the committed lock) and builds the
# real Kubernetes control plane of the `kube` tests (scripts/kube-testenv.sh).

PYTHON ?= python3
# The machine's Go 1.26 (/usr/local/go) first, whatever PATH the caller has (CI's may lack it).
export PATH := $(if $(wildcard /usr/local/go/bin/go),/usr/local/go/bin:)$(PATH)
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo test lint typecheck unit clients kube-testenv helm bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo,test]'
	touch $@ $(RUNTIME_STAMP)

demo: $(RUNTIME_STAMP)
	$(BIN)/metaemu demo $(DEMO_ARGS)

clients:
	bash scripts/install-clients.sh

# The real kube-apiserver, kubectl and etcd of the `kube` tests, built once per machine from their
# published sources (about 7 minutes the first time; cached in ~/.cache/metaemu afterwards).
kube-testenv:
	bash scripts/kube-testenv.sh

# Helm v4, built from helm.sh/helm/v4 (scripts/helm/go.mod) once per machine: about 2 minutes the
# first time (104 s compile on 2 cores); the judge of charts/metaemu (tests/test_helm_chart.py).
helm:
	bash scripts/helm.sh

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

unit: $(TEST_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: $(TEST_STAMP) clients kube-testenv helm lint typecheck unit

# Node mode's benchmarks on a simulated node (issue #11: a new pod's first request; surge upgrades
# and crash restarts under load) need root (network namespaces, iptables) and the kube test bed
# (built on first use); they take --quick (and first_request.py --check) from BENCH_ARGS.
bench: $(TEST_STAMP)
	command -v wrk >/dev/null || apt-get install -y --no-install-recommends wrk
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)
	if [ "$$(id -u)" = 0 ]; then $(BIN)/python benchmarks/first_request.py $(filter --quick --check,$(BENCH_ARGS)); \
	else echo "benchmarks/first_request.py skipped: it needs root" >&2; fi
	if [ "$$(id -u)" = 0 ]; then $(BIN)/python benchmarks/node_upgrade.py $(filter --quick,$(BENCH_ARGS)); \
	else echo "benchmarks/node_upgrade.py skipped: it needs root" >&2; fi

# Regenerate the image's pinned, hash-checked runtime dependencies after changing pyproject.toml.
lock:
	$(PYTHON) -m venv /tmp/metaemu-lock && /tmp/metaemu-lock/bin/pip install -q pip-tools
	/tmp/metaemu-lock/bin/pip-compile -q --generate-hashes --strip-extras --no-header --allow-unsafe \
	  -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) tests/clients/node/node_modules .mypy_cache .ruff_cache .pytest_cache
