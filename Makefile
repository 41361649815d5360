# hostdev developer entry points. `make scan` and `make test` are the README's two commands:
# each installs what it needs itself on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact versions of everything the venv installs (and of pip/setuptools/wheel that build it):
# what CI tested. pyproject.toml keeps the supported ranges; `make lock` re-resolves within them.
CONSTRAINTS := requirements/constraints.txt
PIP_PINNED = pip install -q -c $(CONSTRAINTS)

.PHONY: venv scan test lint unit tools cluster-up cluster-down protos check-protos bench clean lock

# Debian's own python3 ships venv support separately (python3-venv): install it when missing.
# -I keeps the repo root off sys.path: the top-level operator/ folder would shadow the stdlib
# `operator` for an interpreter that has not imported it at start-up (Debian's python3 has not).
# A changed constraints file re-installs: pip moves every package to its pinned version.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -I -m venv $(VENV) || { apt-get install -y -q python3-venv \
		&& $(PY) -I -m venv $(VENV); }
	$(BIN)/$(PIP_PINNED) pip
	$(BIN)/$(PIP_PINNED) --build-constraint $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## The main job: passthrough readiness and devices of this host (no cluster needed).
scan: $(STAMP)
	$(BIN)/hostdev scan

## Everything: test tools (apt + Go builds, cached under ~/.cache), lint, all test tiers.
# HOSTDEV_REQUIRE_ALL_TIERS=1: a tier whose tools are missing fails instead of skipping.
test: $(STAMP)
	scripts/setup-test-tools.sh
	$(MAKE) lint
	HOSTDEV_REQUIRE_ALL_TIERS=1 $(BIN)/pytest -ra

# deviceplugin/ and operator/ by name: ruff does not follow the hostdev/ symlinks to them.
lint: $(STAMP)
	$(BIN)/ruff check hostdev deviceplugin operator tests bench
	$(BIN)/ruff format --check hostdev deviceplugin operator tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint Dockerfile
	scripts/sync-chart-crds.sh --check

## The fast tiers only (no API server, kubelet harness or QEMU guest): seconds, no root needed.
unit: $(STAMP)
	$(BIN)/pytest -ra -m "not kube and not kubelet and not kubevirt and not dra and not kernel"

## Install/build the test tiers' tools only (apt packages, Go builds into ~/.cache/hostdev/bin).
tools:
	scripts/setup-test-tools.sh

## A local etcd + kube-apiserver with the KubeVirt and hostdev CRDs (same as the test fixture);
## prints `export KUBECONFIG=...`. State and logs: ~/.cache/hostdev/cluster.
cluster-up: $(STAMP)
	scripts/cluster.sh up

cluster-down: $(STAMP)
	scripts/cluster.sh down

clean:
	rm -rf $(VENV) build dist *.egg-info

## Re-resolve $(CONSTRAINTS): the newest releases within pyproject.toml's ranges, frozen with
## pip, setuptools and wheel. Run `make venv test` on the result before committing it.
lock:
	scripts/lock-constraints.sh $(PY)
