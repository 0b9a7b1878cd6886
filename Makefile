# The two commands a newcomer runs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint family bench protos clean

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

# ruff everywhere; mypy on the serving half, the client and the torch-free core (pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The default family, built into families/mnist5k (cached base model reused on rebuilds).
family: $(STAMP)
	$(BIN)/adaptive-inference build configs/mnist5k.toml --out families/mnist5k

# The benchmark report, docs/results.md (~15 minutes): router decision time, gRPC overhead, the
# policy comparison on the default family with default serve flags (adaptive vs each pinned
# static on the Pareto front, 0.5x-8x full's capacity, 3 repeats, and a time-varying load),
# then the page itself. Raw figures under results/bench/.
BENCH_OUT := results/bench
BENCH_FAMILY ?= families/mnist5k
bench: $(STAMP)
	@test -f $(BENCH_FAMILY)/manifest.json || $(MAKE) family
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/router.py --json $(BENCH_OUT)/router.json
	$(BIN)/python bench/overhead.py --family $(BENCH_FAMILY) --requests 2000 --json $(BENCH_OUT)/overhead.json
	$(BIN)/python bench/policies.py --family $(BENCH_FAMILY) --out $(BENCH_OUT)/policies
	$(BIN)/python bench/report.py --family $(BENCH_FAMILY) --results $(BENCH_OUT) --docs docs

# Regenerate protos/generated/ from protos/*.proto (the generated files are committed).
# The -I mapping makes the generated modules import each other as protos.generated.*.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos/generated=protos --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/grpc_service.proto protos/adaptive.proto

clean:
	rm -rf $(VENV) families results .pytest_cache .ruff_cache
