# vllm-fleet developer entry points. The two that matter (README.md):
#   make lab-deploy   bring up the local lab and run deploy.yml on it
#   make test         every test tier: lint, unit, engine, lab
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
LAB_INVENTORY := .lab/inventory.ini
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: bootstrap bootstrap-engine lab-up lab-down lab-deploy lint test test-unit test-engine test-lab

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
	$(BIN)/pytest -m "not lab and not engine and not replicas" tests

test-engine: bootstrap-engine
	$(BIN)/pytest -m "engine" tests

test-lab: lab-up
	$(BIN)/pytest -m "lab" tests

test: lint test-unit test-engine test-lab
