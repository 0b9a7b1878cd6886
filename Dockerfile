# adaptive-inference: CPU-only image. Two ways to provide the model family:
#   1. mount it:  docker run -v $PWD/families/mnist5k:/family:ro -p 8001:8001 -p 8002:8002 adaptive-inference
#   2. bake it:   docker build --build-arg FAMILY_CONFIG=configs/demo.toml -t adaptive-inference .
#      (trains and compresses at image build time into /family; minutes on a laptop)
ARG PYTHON=python:3.11-slim

# --- build stage: the virtualenv (CPU torch first: an unpinned torch is a multi-GB CUDA build) ---
FROM ${PYTHON} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url ${TORCH_INDEX} "torch==2.13.0"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compression compression
COPY server server
COPY client client
COPY protos protos
COPY configs configs
RUN pip install '.[demo]'

# Optional: build the family into the image (leave FAMILY_CONFIG empty to mount one instead).
ARG FAMILY_CONFIG=""
RUN mkdir -p /family && if [ -n "$FAMILY_CONFIG" ]; then \
        ADAPTIVE_CACHE=/tmp/cache adaptive-inference build "$FAMILY_CONFIG" --out /family --no-progress \
        && rm -rf /tmp/cache; \
    fi

# --- runtime stage: the venv and the family, run as an unprivileged user ---
FROM ${PYTHON} AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin serve
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=serve /family /family
USER serve
EXPOSE 8001 8002
# The gRPC health service (grpc.health.v1): NOT_SERVING until the family is loaded and warmed up.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["adaptive-inference", "health", "--target", "127.0.0.1:8001"]
ENTRYPOINT ["adaptive-inference", "serve", "/family", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]
