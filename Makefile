# onetrans-trt: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv if it is missing (torch==2.13.0 first and pinned: a CPU build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs
EPOCHS ?= 2
SEEDS  ?= 3
export OMP_NUM_THREADS ?= 2

.PHONY: venv data test demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,kernels]'
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(BIN)/onetrans-trt fetch-data

test: venv data
	$(BIN)/python -m pytest -q

demo: venv data
	$(BIN)/onetrans-trt train --model onetrans --preset small --epochs $(EPOCHS) --seeds $(SEEDS) --out $(RUNS)/onetrans-small --force
	$(BIN)/onetrans-trt train --model baseline --preset small --epochs $(EPOCHS) --seeds $(SEEDS) --out $(RUNS)/baseline-small --force
	@echo
	@echo "== test AUC on MovieLens-100K (mean of $(SEEDS) seeds) =="
	@$(BIN)/python -c "import json,sys; [print(f\"{n:10s} \" + '  '.join(f\"{t} AUC {v['auc']:.4f}\" for t,v in json.load(open(f'$(RUNS)/{n}-small/metrics.json'))['test_mean'].items())) for n in ('onetrans','baseline')]"
	@echo
	$(BIN)/onetrans-trt export $(RUNS)/onetrans-small --out $(RUNS)/build-small --unified --force
	$(BIN)/onetrans-trt inspect $(RUNS)/build-small --candidates 128

clean:
	rm -rf $(RUNS) .pytest_cache
