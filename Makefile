# hired-edge: every set-up step lives here, so a fresh clone needs only `make demo` / `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
STAMP   := $(VENV)/.installed
MODEL   ?= tiny
QUANT   ?=
OUT     ?= artifacts/$(notdir $(MODEL))$(if $(filter int4 int8,$(QUANT)),-$(QUANT))
ARTIFACTS ?= artifacts/tiny
IMAGE   ?= assets/demo.png
PROMPT  ?= What is in this picture?
BUDGET  ?= 0.2
EXPORT_FLAGS ?=
ifeq ($(RANDOM_WEIGHTS),1)
EXPORT_FLAGS += --random-weights
endif
ifneq ($(QUANT),)
EXPORT_FLAGS += --quant $(QUANT)
endif

.PHONY: install demo test test-fast lint export bench soak eval serve triton-repo serve-bench openai clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -m pip install -q -c constraints.txt -e '.[export,bench,client,openai,dev]'
	touch $(STAMP)

checkpoints/tiny/config.json: | $(STAMP)
	$(PYTHON) -m models.build tiny --out checkpoints/tiny --force

checkpoints/tiny-llava15/config.json: | $(STAMP)
	$(PYTHON) -m models.build tiny-llava15 --out checkpoints/tiny-llava15 --force

# `make export MODEL=llava-next-7b [RANDOM_WEIGHTS=1] [QUANT=int4|int8] [EXPORT_FLAGS="--dtype fp16 --opset 18"]`;
# QUANT writes artifacts/<model>-<quant> (decoder weights as MatMulNBits, vision and projector float); MODEL=tiny (or
# tiny-llava15) builds checkpoints/<name> first. python -m export chooses the in-memory or the streaming route
# itself and prints which.
BUILT   := $(filter tiny tiny-llava15,$(MODEL))
export: $(STAMP) $(if $(BUILT),checkpoints/$(BUILT)/config.json)
	$(PYTHON) -m export --model $(if $(BUILT),checkpoints/$(BUILT),$(MODEL)) --out $(OUT) --force --verify $(EXPORT_FLAGS)

artifacts/tiny/manifest.json: | checkpoints/tiny/config.json
	$(PYTHON) -m export --model checkpoints/tiny --out artifacts/tiny --force --verify

demo: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m runtime.demo --artifacts $(ARTIFACTS) --image $(IMAGE) --prompt "$(PROMPT)" --budget $(BUDGET)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# the inner loop: everything but the `slow` tests (soak, generated fuzz groups, export kills, live servers)
test-fast: $(STAMP)
	$(BIN)/ruff check . && HIRED_TEST_CACHE=.test-cache $(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) -m bench

soak: $(STAMP) artifacts/tiny/manifest.json
	$(PYTHON) -m bench.soak --artifacts artifacts/tiny --minutes 10

# Accuracy against budget (bench.eval): the shipped sample set by default; for a real task file set QUESTIONS,
# IMAGES (the image folder) and EVAL_FLAGS (e.g. "--answers labels.json --answer-style short").
QUESTIONS  ?= bench/eval/sample/questions.jsonl
IMAGES     ?= bench/eval/sample/images
BUDGETS    ?= 1.0,0.5,0.2,0.1
EVAL_OUT   ?= out/eval-$(notdir $(ARTIFACTS))
EVAL_FLAGS ?= --max-new-tokens 16
eval: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m bench.eval --artifacts $(ARTIFACTS) --questions $(QUESTIONS) --image-folder $(IMAGES) \
		--budgets $(BUDGETS) --out $(EVAL_OUT) $(EVAL_FLAGS)

# Serving (Triton): the first `make serve` creates .venv-serve (numpy<2 + PyTriton), a cache `clean` keeps.
TRITON_REPO ?= triton-repo
serve: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m serving --artifacts $(ARTIFACTS)

triton-repo: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m serving.triton_repo --artifacts $(ARTIFACTS) --out $(TRITON_REPO) --force

serve-bench: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m bench.serve_bench --artifacts $(ARTIFACTS)

# The OpenAI-compatible API (main environment): `make openai [PORT=8080] [OPENAI_FLAGS="--api-key K"]`.
PORT ?= 8080
OPENAI_FLAGS ?=
openai: $(STAMP) $(if $(filter artifacts/tiny,$(ARTIFACTS)),artifacts/tiny/manifest.json)
	$(PYTHON) -m serving.openai --artifacts $(ARTIFACTS) --port $(PORT) $(OPENAI_FLAGS)

clean:
	rm -rf checkpoints artifacts bench-results out triton-repo .pytest_cache .hypothesis .test-cache
