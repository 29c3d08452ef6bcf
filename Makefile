# onetrans-trt: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv if it is missing (torch==2.13.0 first and pinned: a CPU build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNS   ?= runs
EPOCHS ?= 2
SEEDS  ?= 1
TIMES  := $(RUNS)/.demo-times
STAGE  = $(BIN)/python tools/stage.py --log $(TIMES)
export OMP_NUM_THREADS ?= 2

.PHONY: venv data test test-heavy serve-test demo clean browser qemu redis fuzz gpu-check doctor mutation readme-figures

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,kernels,cpu]'
	touch $(STAMP)

venv: $(STAMP)

data: venv
	$(BIN)/onetrans-trt fetch-data

# headless Chromium renders the HTML validation report in a test (skipped if unavailable)
browser:
	@command -v chromium >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q chromium >/dev/null 2>&1)) || echo "chromium not installed: the report-rendering test will skip")

# qemu-x86_64 (Debian's qemu-user) emulates an AVX2 CPU without VNNI, where ONNX Runtime's default
# INT8 kernels saturate: tests/test_ort_options.py shows our sessions exact there (skipped if absent)
qemu:
	@command -v qemu-x86_64 >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q qemu-user >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q qemu-user >/dev/null 2>&1)) || echo "qemu-user not installed: the no-VNNI INT8 tests will skip")

# redis-server (Debian's package): tests/runtime/test_store.py starts one on a loopback port for the
# shared user-state store (two Rankers sharing it, Redis killed mid-load); those tests skip without it
redis:
	@command -v redis-server >/dev/null 2>&1 || (command -v apt-get >/dev/null 2>&1 && \
	  (apt-get install -y -q redis-server >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && \
	   apt-get install -y -q redis-server >/dev/null 2>&1)) || echo "redis-server not installed: the redis store tests will skip")

# the fast subset of the Triton server tests runs here (one real tritonserver on the tiny build:
# raw JSON over HTTP and gRPC, tensors, start/stop with no process left); `make serve-test` runs all
# two pytest workers (pytest-xdist --dist loadfile: a test file stays on one worker, so its module
# fixtures are built once; loadgroup does not group under pytest 9.2, xdist 3.8), one math thread
# each; the slowest tests are listed at the end (a CI log's tail shows where the time went)
TEST_WORKERS ?= 2
test: venv data browser qemu redis
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not heavy and not serve_full" --durations=25

# the tests that take minutes each (onetrans-s fusion, the HyFormer CLI chain, SIGKILL inside
# export/calibrate writes, the three example modules exported and validated, bench suites)
test-heavy: venv data browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m heavy --durations=15

# the whole Triton server suite: a real tritonserver (the nvidia-pytriton 0.7.0 wheel, fetched with
# `pip download` into ~/.cache/onetrans-trt/tritonserver on first use) on loopback; both families,
# FP16/INT8 variants, request limits, concurrent users. Fails (instead of skipping) without a server.
serve-test: venv data redis
	ONETRANS_TRT_REQUIRE_TRITON=1 OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/serving

# the hardening suite at full strength: 10x the fuzz inputs (33,000: 22,000 requests, 3,000 of them
# through the CLI; checkpoints, manifests, ONNX files), 20 SIGKILL trials per command
fuzz: venv data
	FUZZ_SCALE=10 KILL_TRIALS=20 $(BIN)/python -m pytest -q tests/hardening

# the TensorRT/GPU path on one NVIDIA GPU (< 8 min): versions first, then kernels launched with
# TensorRT's layout, one-node plugin engines, tiny preset trt vs ort, ORT CUDA vs CPU; without a
# GPU it runs the CPU parts and prints each skipped part with its reason. Needs a CUDA torch,
# tensorrt>=11, cuda-python (or cupy) and onnxruntime-gpu for the GPU parts.
gpu-check: venv
	$(BIN)/python -m onetrans_trt.gpu_check --json gpu-check.json

# mutation testing (a measurement, not part of `make test`): mutmut 3 per module with the tests
# that cover it, in a scratch copy under runs/mutation/work/; report in runs/mutation/report.md
MUTATION_MINUTES ?= 240
mutation: venv data
	$(BIN)/python -m pip install -q --disable-pip-version-check mutmut==3.8.1
	nice -n 19 $(BIN)/python tools/mutation.py --max-minutes $(MUTATION_MINUTES)

# the README's figures (test counts, the tiny build's node counts, `info`'s output, the demo
# checkpoint's FP16/INT8 quality table) rewritten from runs of the code; tests check they match
readme-figures: venv data
	$(BIN)/python tools/readme_figures.py --heavy

doctor: venv
	$(BIN)/onetrans-trt doctor

demo: venv data
	@rm -f $(TIMES); mkdir -p $(RUNS)
	$(STAGE) "train onetrans" -- $(BIN)/onetrans-trt train --model onetrans --preset small --epochs $(EPOCHS) --seeds $(SEEDS) --out $(RUNS)/onetrans-small --force
	$(STAGE) "train hyformer" -- $(BIN)/onetrans-trt train --model hyformer --preset small --epochs $(EPOCHS) --seeds $(SEEDS) --out $(RUNS)/hyformer-small --force
	$(STAGE) "train baseline" -- $(BIN)/onetrans-trt train --model baseline --preset small --epochs $(EPOCHS) --seeds $(SEEDS) --out $(RUNS)/baseline-small --force
	@echo
	@echo "== test AUC on MovieLens-100K (mean of $(SEEDS) seeds) =="
	@$(BIN)/python -c "import json,sys; [print(f\"{n:10s} \" + '  '.join(f\"{t} AUC {v['auc']:.4f}\" for t,v in json.load(open(f'$(RUNS)/{n}-small/metrics.json'))['test_mean'].items())) for n in ('onetrans','hyformer','baseline')]"
	@echo
	$(STAGE) "export onetrans" -- $(BIN)/onetrans-trt export $(RUNS)/onetrans-small --out $(RUNS)/build-small --unified --force
	$(STAGE) "inspect" -- $(BIN)/onetrans-trt inspect $(RUNS)/build-small --candidates 128
	$(STAGE) "convert" -- $(BIN)/onetrans-trt convert $(RUNS)/build-small --precision fp16
	$(STAGE) "calibrate" -- $(BIN)/onetrans-trt calibrate $(RUNS)/build-small --data ml-100k --samples 128
	-$(STAGE) "build" -- $(BIN)/onetrans-trt build $(RUNS)/build-small --precision int8
	$(STAGE) "validate onetrans" -- $(BIN)/onetrans-trt validate $(RUNS)/build-small --data ml-100k --count 100 \
	  --json-out $(RUNS)/build-small/reports/validate.json --html $(RUNS)/build-small/reports/validate.html
	@echo "validation report: $(RUNS)/build-small/reports/validate.html"
	$(STAGE) "export hyformer" -- $(BIN)/onetrans-trt export $(RUNS)/hyformer-small --out $(RUNS)/build-hyformer-small --force
	$(STAGE) "validate hyformer" -- $(BIN)/onetrans-trt validate $(RUNS)/build-hyformer-small --data ml-100k --count 100 --backends torch-split,ort \
	  --json-out $(RUNS)/build-hyformer-small/reports/validate.json
	@echo
	@echo "== bench --quick: the serving path against the naive peers, on the demo build =="
	$(STAGE) "bench" -- $(BIN)/onetrans-trt bench $(RUNS)/build-small --quick --out $(RUNS)/build-small/reports/bench.json
	@echo
	@$(BIN)/python tools/stage.py --log $(TIMES) --report

clean:
	rm -rf $(RUNS) .pytest_cache
