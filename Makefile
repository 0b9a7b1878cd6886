# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint family bench docs protos clean container-deps image test-container

setup: $(STAMP)

# torch first, pinned to the CPU wheel: any other version or an open range pulls a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,dev,demo]'
	touch $(STAMP)

# Adaptive vs pinned `full` on the same load ramp (~1 minute once families/demo is built);
# tables on stdout, the plot in results/demo/demo.png.
demo: $(STAMP)
	$(BIN)/adaptive-inference demo

test: lint
	$(BIN)/python -m pytest -q

# The container: Debian's docker.io and debootstrap (apt, root), a private dockerd with its data
# under ~/.cache/adaptive-inference/container, the image built from the unchanged Dockerfile on a
# debootstrapped base with the wheels served over 127.0.0.1 (deploy/container/local-docker.sh).
# `make test` deselects the container tests; `make test-container` runs them (minutes).
container-deps:
	deploy/container/local-docker.sh install

# `make image` leaves the daemon running for `docker run`s: eval "$$(deploy/container/local-docker.sh env)";
# `deploy/container/local-docker.sh stop` ends it.
image: $(STAMP) container-deps
	deploy/container/local-docker.sh start
	deploy/container/local-docker.sh build adaptive-inference:local

test-container: $(STAMP) container-deps
	$(BIN)/python -m pytest -q -m container tests/container

# ruff everywhere; mypy on the serving half, the client and the torch-free core (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The default family, built into families/mnist5k (cached base model reused on rebuilds).
family: $(STAMP)
	$(BIN)/adaptive-inference build configs/mnist5k.toml --out families/mnist5k

# The benchmark report, docs/results.md (~22 minutes): router decision time, gRPC overhead, the
# policy comparison on the default family with default serve flags (adaptive vs each pinned
# static on the Pareto front, 0.5x-8x full's capacity, 3 repeats, and a time-varying load),
# the per-process ceiling (echo vs server, unary vs stream, 1 and 2 workers, each also with
# --grpc-io event-engine; and with the server on CPU 0, the clients on CPU 1, whose rounds agree
# to a few %), goodput past saturation with and without --backlog and with --grpc-io
# event-engine (one server on CPU 0, the load generator on CPU 1: the
# rates suit a core of this 2-core machine), then the page itself. Raw figures under
# results/bench/; bench/ceiling.py and bench/scaleout.py's 16-core runs are device runs, kept.
BENCH_OUT := results/bench
BENCH_FAMILY ?= families/mnist5k
bench: $(STAMP)
	@test -f $(BENCH_FAMILY)/manifest.json || $(MAKE) family
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/router.py --json $(BENCH_OUT)/router.json
	$(BIN)/python bench/overhead.py --family $(BENCH_FAMILY) --requests 2000 --json $(BENCH_OUT)/overhead.json
	$(BIN)/python bench/policies.py --family $(BENCH_FAMILY) --out $(BENCH_OUT)/policies
	$(BIN)/python bench/ceiling.py --family $(BENCH_FAMILY) --workers-list 1,2 --stream \
		--compare "event-engine=--grpc-io event-engine" --json $(BENCH_OUT)/ceiling-2core.json
	$(BIN)/python bench/ceiling.py --family $(BENCH_FAMILY) --workers-list 1 --stream --clients 2 \
		--repeats 5 --server-cpus 0 --client-cpus 1 --compare "event-engine=--grpc-io event-engine" \
		--json $(BENCH_OUT)/ceiling-2core-pinned.json
	$(BIN)/python bench/scaleout.py --family $(BENCH_FAMILY) --workers-list 1 --flags "" \
		--flags "--grpc-io event-engine" --flags "--backlog 8" --client-throttle \
		--rates 500,1000,1500,2000,3000,4000 --seconds 5 --clients 2 --server-cpus 0 --client-cpus 1 \
		--json $(BENCH_OUT)/scaleout-2core.json
	$(BIN)/python bench/report.py --family $(BENCH_FAMILY) --results $(BENCH_OUT) --docs docs

# The measured blocks of docs/*.md (bench/docs.py), re-rendered from one fresh run (~10 minutes):
# the tests that record their figures, the container test, the memory and soak benchmarks, the
# demo's final screen and plot.
MEASURED := results/measured
RECORDING_TESTS := tests/integration/test_fuzz.py tests/integration/test_reliability_faults.py \
	tests/integration/test_reliability_overload.py tests/integration/test_shutdown.py \
	tests/integration/test_scaleout.py tests/integration/test_metrics_endpoint.py \
	tests/integration/test_workers_heal.py
docs: $(STAMP)
	@test -f $(BENCH_FAMILY)/manifest.json || $(MAKE) family
	@mkdir -p $(MEASURED)
	$(BIN)/python -m pytest -q $(RECORDING_TESTS)
	$(MAKE) test-container
	$(BIN)/python bench/memory.py --family $(BENCH_FAMILY) --json $(MEASURED)/memory.json > $(MEASURED)/memory.md
	$(BIN)/python bench/soak.py --json $(MEASURED)/soak.json > $(MEASURED)/soak.md
	$(BIN)/adaptive-inference demo --screen $(MEASURED)/demo.txt
	cp results/demo/demo.png docs/demo.png
	$(BIN)/python bench/docs.py

# Regenerate protos/generated/ from protos/*.proto (the generated files are committed).
# The -I mapping makes the generated modules import each other as protos.generated.*.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos/generated=protos --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/grpc_service.proto protos/adaptive.proto

clean:
	rm -rf $(VENV) families results .pytest_cache .ruff_cache
