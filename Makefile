# One target per verb. CI (.ci/run) calls `make test`; the README's run command is `make demo`.
PY ?= .venv/bin/python
PROTO_SRC := proto/specthink/v1/specthink.proto

.PHONY: install demo proto proto-check lint test test-fast bench eval

install:            ## create .venv and install everything (runtimes, dev tools, demo models)
	bash scripts/install.sh

demo: install       ## README command (a): local cloud + edge on real small models
	bash scripts/demo.sh

proto:              ## regenerate shared/rpc from proto/ (committed; CI checks for drift)
	$(PY) -m grpc_tools.protoc -Ishared/rpc=proto/specthink/v1 \
		--plugin=protoc-gen-mypy=$(dir $(PY))protoc-gen-mypy \
		--python_out=. --grpc_python_out=. --mypy_out=. $(PROTO_SRC)

proto-check: proto
	git diff --exit-code -- shared/rpc || (echo "shared/rpc drifted from proto/: run make proto and commit" && exit 1)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: install proto-check lint   ## README command (b): the whole test suite
	$(PY) -m pytest -q

test-fast:          ## every test that runs no real model (-m "not real_models"): under a minute
	$(PY) -m pytest -q -m "not real_models"

bench:
	$(PY) -m scripts.bench
