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
# (recorded measurements read back), 08 (the serving engine's timings under load) and 10 (TP against PP: the same
# tokens as notebook 05's, and its stages' timings; kept out to hold CI under 15 minutes).
GEMM_TESTS := tests/test_layers.py tests/test_rounding.py tests/test_model_layers.py \
	"tests/test_serving_engine.py::test_sliding_window_attention_through_the_paged_cache_matches_hugging_face[False]"
GEMM_NOTEBOOKS := $(filter-out notebooks/02_% notebooks/06_% notebooks/07_% notebooks/08_% notebooks/10_%,\
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

# Every pass runs, whatever the one before it did; a summary names each pass's result, and the target fails at
# the end if any pass failed.
test: setup
	@status=0; summary=""; \
	run() { name=$$1; shift; echo "== $$name: $$*"; if "$$@"; then summary="$$summary\n  passed: $$name"; \
	        else summary="$$summary\n  FAILED: $$name"; status=1; fi; }; \
	run "unit tests and notebooks" $(BIN)/python -m pytest tests notebooks --nbmake -q; \
	run "another GEMM path ($(OTHER_GEMM_PATH))" env $(OTHER_GEMM_PATH) $(BIN)/python -m pytest $(GEMM_TESTS) \
	    $(GEMM_NOTEBOOKS) --nbmake -q; \
	run "notebook 06 rendered" $(MAKE) --no-print-directory render; \
	printf "make test:$$summary\n"; exit $$status

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
