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
	$(BIN)/pip install -q -e '.[dev,demo]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptive-inference demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The default family, built into families/mnist5k (cached base model reused on rebuilds).
family: $(STAMP)
	$(BIN)/adaptive-inference build configs/mnist5k.toml --out families/mnist5k

# Serving benchmarks (results in docs/serving.md): router decision time, then gRPC overhead.
bench: $(STAMP)
	$(BIN)/python bench/router.py
	$(BIN)/python bench/overhead.py

# Regenerate protos/generated/ from protos/*.proto (the generated files are committed).
# The -I mapping makes the generated modules import each other as protos.generated.*.
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos/generated=protos --python_out=. \
		--grpc_python_out=. --pyi_out=. protos/grpc_service.proto protos/adaptive.proto

clean:
	rm -rf $(VENV) families results .pytest_cache .ruff_cache
