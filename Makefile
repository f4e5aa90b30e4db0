# vllm-fleet developer entry points. The two that matter (README.md):
#   make lab-deploy   bring up the local lab and run deploy.yml on it
#   make test         every test tier: lint, unit, engine, lab
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
LAB_INVENTORY := .lab/inventory.ini
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
# LOAD=1: run each test tier under the standard background CPU load (tools/with_load.sh:
# stress-ng keeping every core busy), as on a shared or CI machine. `make test LOAD=1` loads each
# tier; `tools/with_load.sh make test` also loads the background deploy.
LOAD ?=
UNDER_LOAD := $(if $(filter-out 0,$(LOAD)),tools/with_load.sh,)
# Each tier's temporary files (engine and Ray logs included) in a fixed directory of this
# checkout's own, /tmp/fleettest-<checksum of its path>-<tier> (pytest empties it at the start),
# instead of the next number in the machine-wide /tmp/pytest-of-<user>. Short on purpose: tests
# bind unix sockets in there.
TEST_TMP := /tmp/fleettest-$(firstword $(shell printf '%s' '$(CURDIR)' | cksum))
PYTEST = $(UNDER_LOAD) $(BIN)/pytest --basetemp=$(TEST_TMP)-$(subst test-,,$@)

.PHONY: bootstrap bootstrap-engine lab-up lab-down lab-deploy lint test test-unit test-engine test-lab test-day2

bootstrap:
	tools/bootstrap.sh controller

bootstrap-engine:
	tools/bootstrap.sh engine

lab-up: bootstrap-engine
	python3 tests/lab/lab.py up

lab-down:
	python3 tests/lab/lab.py down

lab-deploy: lab-up
	$(BIN)/ansible-playbook -i $(LAB_INVENTORY) deploy.yml

lint: bootstrap
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production

test-unit: bootstrap
	$(PYTEST) -m "not lab and not engine and not day2" tests

test-engine: bootstrap-engine
	$(PYTEST) -m "engine" tests

test-lab: lab-up
	$(PYTEST) -m "lab" tests

# Rolling restarts under load and fault tests (kill -9, fabric cut, Ray head restart) on the lab.
test-day2: lab-up
	$(PYTEST) -m "day2" tests

# The lab's cold deploy (about 15 min on 2 cores, mostly apt, image copies and engine start-up)
# runs in the background while lint, unit and engine tests run; the lab tier then starts from a
# deployed lab (its own deploy.yml run is a re-run). A failed background deploy is not hidden: the
# lab tier's deploy fails the same way, with its output. Log: .lab/deploy-background.log.
test: lab-up
	@echo "[test] deploy.yml on the lab in the background (log: .lab/deploy-background.log)"
	@rm -f .lab/deploy-background.ok; \
	 ( $(BIN)/ansible-playbook -i $(LAB_INVENTORY) deploy.yml > .lab/deploy-background.log 2>&1 \
	     && touch .lab/deploy-background.ok; \
	   echo "[test] background deploy.yml ended after $$SECONDS s ($$(ls .lab/deploy-background.ok 2>/dev/null || echo failed))" ) & \
	 $(MAKE) --no-print-directory lint test-unit test-engine; rc=$$?; \
	 echo "[test] waiting for the background deploy"; wait; exit $$rc
	@if [ -e .lab/deploy-background.ok ]; then export FLEET_LAB_DEPLOY_LOG=$(CURDIR)/.lab/deploy-background.log; fi; \
	 $(MAKE) --no-print-directory test-lab
