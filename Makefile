# Two commands do everything (each sets up .venv first):
#   make test   unit tests + every notebook under nbmake
#   make demo   the main job: the bundled tiny model writes the same text on 1, 2, 4 and 8 ranks
# and `make lab` opens JupyterLab on notebooks/.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lab strip clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest tests notebooks --nbmake -q

DEMO_PROMPTS := --prompt "The with statement" --prompt "An object is"

demo: setup
	for tp in 1 2 4 8; do $(BIN)/python -m tplab generate --tp $$tp --max-new-tokens 24 $(DEMO_PROMPTS) || exit 1; done

lab: setup
	$(BIN)/jupyter lab notebooks/

strip: setup
	$(BIN)/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV)
