# specdec: exact speculative decoding over gRPC, CPU image.
# Written and checked by tests/test_deploy.py (flags, ports, user, volume); not yet built here (no Docker engine).
#
#   docker build -t specdec:0.1.0 .
#   docker run -p 50051:50051 -p 9090:9090 -v specdec-models:/models specdec:0.1.0
#
# Models are not baked in: /models is a volume ($SPECDEC_CACHE). Mount a cache that already holds the
# converted default pair, or let the first start fetch it into the volume (`specdec models fetch`).

# ---- build: the wheel with the C++ kernels ------------------------------------------------------
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml CMakeLists.txt README.md ./
COPY csrc csrc
COPY python python
COPY proto proto
RUN pip install --no-cache-dir scikit-build-core pybind11 ninja \
    && pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels .

# ---- runtime ------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime
# The CPU wheel of torch first, so the project's torch range never pulls a CUDA build.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN groupadd --system --gid 10001 specdec \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/specdec --create-home specdec \
    && mkdir -p /models && chown 10001:10001 /models
ENV SPECDEC_CACHE=/models \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
USER 10001:10001
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["specdec", "health", "--address", "127.0.0.1:50051", "--timeout", "4"]
ENTRYPOINT ["specdec", "serve"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090", "--log-format", "json"]
