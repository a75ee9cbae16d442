# Two commands do everything (each sets up .venv first):
#   make test   unit tests + every notebook under nbmake
#   make demo   the main job: TP generation from the command line
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

demo: setup
	$(BIN)/python -m tplab demo

lab: setup
	$(BIN)/jupyter lab notebooks/

strip: setup
	$(BIN)/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV)
