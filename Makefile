# The two commands a new user needs:
#   make demo   run the whole system on this machine (local mode) and watch it scale
#   make test   install and start the real services it needs, run every test, stop what it started
#
# Everything downloaded or built from source is cached in ~/.cache/queue-processor (by version).

SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help env-up env-down env-status build lint unit test bench demo crds image clean

help: ## show this help
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

env-up: ## install, build and start etcd, the control plane, a real node (containerd, kubelet, kube-proxy), Kafka, Redis, Prometheus
	@bash hack/env.sh up

env-down: ## stop every local service started by env-up, undo the node's host changes, fail if anything is left
	@bash hack/env.sh down

env-status: ## list local services with version and address, the node, its images and pods
	@bash hack/env.sh status

build: ## build the qp-operator and qp-worker binaries (debug)
	$(CARGO) build --workspace --bins

lint: ## rustfmt and clippy (warnings are errors), and kube-score on the chart's renders
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	bash hack/lint-chart.sh

unit: ## every crate's unit tests; no service needed (black-box tests live in tests/)
	$(CARGO) test --workspace --exclude qp-tests

test: ## start what is needed, run the whole test suite, stop what was started
	@bash hack/test.sh

demo: ## run the whole system on this machine (local mode) and watch it scale with a burst of requests
	@bash hack/demo.sh

bench: ## benchmarks; prints `name value unit` lines (see BENCHMARKS.md)
	@bash hack/bench.sh

crds: ## regenerate crds/ from the Rust types
	$(CARGO) run -q -p qp-operator --bin crdgen > crds/queueprocessor.yaml
	cp crds/queueprocessor.yaml charts/queue-processor/files/queueprocessor.yaml

image: ## build the container image and the pause image as OCI archives in target/image/ (no registry; hack/image.sh)
	@bash hack/image.sh && bash hack/pause-image.sh

clean: env-down
	rm -rf .qp-env target
