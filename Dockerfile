# adaptive-inference: CPU-only serving image (onnxruntime, no torch, no CUDA), run as a non-root user.
# Two ways to provide the model family:
#   1. mount it (the image's /family stays empty):
#        docker build -t adaptive-inference .
#        docker run -v $PWD/families/mnist5k:/family:ro -p 8001:8001 -p 8002:8002 adaptive-inference
#   2. bake it in (trains and compresses at image build time into /family; minutes on a laptop):
#        docker build --build-arg FAMILY_CONFIG=configs/demo.toml -t adaptive-inference:demo .
# The server verifies every artifact's sha256 on start and refuses a tampered family (exit 2).
# TLS / tokens: mount the PEM files and the token (e.g. a Kubernetes Secret) and add
#   --tls-cert /certs/tls.crt --tls-key /certs/tls.key [--tls-client-ca /certs/ca.crt]
#   [--auth-token-file /secrets/token]
# as arguments after the image name; the health service stays exempt from the token.
ARG PYTHON=python:3.11-slim

# --- build stage: the serving virtualenv (no torch), and only when a family is baked in, a
# second, throw-away one with the build extra (CPU torch first: an unpinned torch is a multi-GB
# CUDA build) that trains and compresses it ---
FROM ${PYTHON} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Another index instead of PyPI, e.g. a loopback one serving `pip download`ed wheels
# (deploy/container/local-docker.sh); pip reads it from the environment. Unset: PyPI.
ARG PIP_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compression compression
COPY server server
COPY client client
COPY protos protos
COPY configs configs
# onnxruntime from PyPI is the CPU build on Linux x86_64 (the GPU one is onnxruntime-gpu).
RUN python -m venv /opt/venv && /opt/venv/bin/pip install . && /opt/venv/bin/python -c "\
import importlib.util, onnxruntime; \
assert importlib.util.find_spec('torch') is None, 'torch in the serving venv'; \
assert 'CUDAExecutionProvider' not in onnxruntime.get_available_providers()"

# Optional: build the family into the image (leave FAMILY_CONFIG empty to mount one instead).
ARG FAMILY_CONFIG=""
RUN mkdir -p /family && if [ -n "$FAMILY_CONFIG" ]; then \
        python -m venv /opt/build \
        && /opt/build/bin/pip install --index-url ${TORCH_INDEX} "torch==2.13.0" \
        && /opt/build/bin/pip install '.[build,demo]' \
        && ADAPTIVE_CACHE=/tmp/cache /opt/build/bin/adaptive-inference build "$FAMILY_CONFIG" \
            --out /family --no-progress \
        && rm -rf /tmp/cache /opt/build; \
    fi

# --- runtime stage: the venv and the family, run as an unprivileged user ---
FROM ${PYTHON} AS runtime
# ADAPTIVE_INFERENCE_PORT: the gRPC port `serve` listens on and `health` probes by default; set
# it (docker run -e ADAPTIVE_INFERENCE_PORT=9001) rather than --port, so both move together.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    ADAPTIVE_INFERENCE_PORT=8001
# Numeric USER: Kubernetes can verify runAsNonRoot only for a numeric one.
RUN groupadd --system --gid 10001 serve \
    && useradd --system --uid 10001 --gid serve --no-create-home --shell /usr/sbin/nologin serve
COPY --from=build /opt/venv /opt/venv
# Read-only for the server: it only reads and verifies the family.
COPY --from=build /family /family
USER 10001:10001
EXPOSE 8001 8002
# The gRPC health service (grpc.health.v1): NOT_SERVING until the family is verified, loaded and
# warmed up, and again from SIGTERM on; the command exits 0 only when SERVING.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["adaptive-inference", "health"]
# SIGTERM: NOT_SERVING, new requests refused, in-flight ones finish within --grace-s (keep it
# under the orchestrator's kill timeout: docker stop -t, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["adaptive-inference", "serve", "/family", "--host", "0.0.0.0", \
            "--metrics-port", "8002", "--grace-s", "20"]
