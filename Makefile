# Two commands do everything (each sets up .venv first):
#   make test   unit tests + every notebook under nbmake
#   make demo   the main job: the bundled tiny model writes the same text on 1, 2, 4 and 8 ranks
# and `make lab` opens JupyterLab on notebooks/.
#
# CPU-only machines: PyPI's torch wheel for Linux is the CUDA build (several GB). Give PyTorch's CPU wheel index
# and torch is installed from it first, at the pinned version:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
PY ?= python3
TORCH_INDEX ?=
# Another GEMM code path than this CPU's default (MKL's portable kernels): results that depend on which kernel
# BLAS picks change under it, so tests that assert such bits fail here as they would on another CPU.
OTHER_GEMM_PATH := MKL_CBWR=COMPATIBLE
# What runs under that path: the layer and model tests, the paged cache's tokens against HF's, and the notebooks that
# multiply weights: all but 02 (collectives), 06 (the cost model's explorer, rendered on its own below), 07
# (recorded measurements read back), 08 (the serving engine's timings under load), and 05 and 10 (the generation
# loop's tokens, which the model tests check on this path too, and its timings; kept out to hold CI under 15 minutes).
GEMM_TESTS := tests/test_layers.py tests/test_rounding.py tests/test_model_layers.py \
	"tests/test_serving_engine.py::test_sliding_window_attention_through_the_paged_cache_matches_hugging_face[False]"
GEMM_NOTEBOOKS := $(filter-out notebooks/02_% notebooks/05_% notebooks/06_% notebooks/07_% notebooks/08_% notebooks/10_%,\
	$(wildcard notebooks/*.ipynb))
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup lint test render demo lab strip clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	if [ -n "$(TORCH_INDEX)" ]; then $(BIN)/pip install --quiet --index-url "$(TORCH_INDEX)" "$$(grep '^torch==' constraints.txt)"; fi
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# pyflakes and import order (pyproject.toml [tool.ruff]) over the package, tests, scripts and notebooks
lint: setup
	$(BIN)/ruff check .

# The passes run as two streams at once: the unit tests; and the notebooks, then the other GEMM path, then notebook 06
# rendered, then the compiled-step tests. Each stream keeps about one core busy on average (the rest is rank
# processes starting, and waiting), so together they keep both cores of a 2-core machine busy. Three things run last,
# alone, since their claims are about a machine with a core to spare: the Ctrl-C tests (they interrupt a command once
# its ranks serve, which takes seconds more while the other stream runs), notebook 05 (shared memory beats loopback
# TCP by 2x) and notebook 10 (micro-batches shorten the pipeline's waits). Every pass runs, whatever another did; each
# pass's output is printed whole at the end, then a summary names each pass's result, and the target fails unless
# every pass passed.
TEST_LOGS := build/test-logs
ALONE := tests/test_interrupt.py notebooks/05_tp_generation_loop.ipynb notebooks/10_tp_against_pp.ipynb
STREAM_B_TESTS := tests/test_compiled.py
test: setup
	@rm -rf $(TEST_LOGS); mkdir -p $(TEST_LOGS); \
	run() { log=$$1; name=$$2; shift 2; echo "== $$name: $$*" > $(TEST_LOGS)/$$log; \
	        if "$$@" >> $(TEST_LOGS)/$$log 2>&1; then echo "  passed: $$name"; else echo "  FAILED: $$name"; fi \
	        > $(TEST_LOGS)/$$log.result; }; \
	run 1-tests "unit tests" $(BIN)/python -m pytest tests -q $(foreach t,$(filter tests/%,$(ALONE)) $(STREAM_B_TESTS),--ignore=$(t)) & \
	{ run 2-notebooks "notebooks" $(BIN)/python -m pytest $(filter-out $(ALONE),$(wildcard notebooks/*.ipynb)) --nbmake -q; \
	  run 3-gemm "another GEMM path ($(OTHER_GEMM_PATH))" env $(OTHER_GEMM_PATH) $(BIN)/python -m pytest \
	      $(GEMM_TESTS) $(GEMM_NOTEBOOKS) --nbmake -q; \
	  run 4-render "notebook 06 rendered" $(MAKE) --no-print-directory render; \
	  run 5-compiled "compiled-step tests" $(BIN)/python -m pytest $(STREAM_B_TESTS) -q; } & \
	wait; \
	run 6-alone "Ctrl-C tests, notebooks 05 and 10, alone" $(BIN)/python -m pytest $(ALONE) --nbmake -q; \
	for log in 1-tests 2-notebooks 3-gemm 4-render 5-compiled 6-alone; do cat $(TEST_LOGS)/$$log; done; \
	echo "make test:"; cat $(TEST_LOGS)/*.result; test "$$(cat $(TEST_LOGS)/*.result | grep -c passed)" = 6

# Notebook 06 (the widget explorer) rendered the way a reader publishes it. It takes ~10 s; a widget cell that
# stalls headless executors (they wait on a reply they already got) would take the per-cell timeout, so the
# whole render is bounded well below it.
render: setup
	timeout 120 $(BIN)/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=300 \
		notebooks/06_tp_degree_explorer.ipynb --output-dir build/notebooks

DEMO_PROMPTS := --prompt "The with statement" --prompt "An object is"

demo: setup
	$(BIN)/python -m tplab generate --tp 1,2,4,8 --max-new-tokens 24 $(DEMO_PROMPTS)

lab: setup  # containers often run as root, which Jupyter refuses without --allow-root
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

strip: setup
	$(BIN)/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV)
