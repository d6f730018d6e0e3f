# Lab-report generator: train a grid of Keras runs, watch it in TensorBoard, write the report.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXPERIMENT ?= lab
LOGDIR ?= logs
REPORTS ?= reports
FASHION_DIR := /usr/share/datasets/fashion-mnist

TRAIN_ARGS := --experiment $(EXPERIMENT) --logdir $(LOGDIR) \
	$(if $(DATASET),--dataset $(DATASET)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(DATA),--data $(DATA)) \
	$(if $(VERBOSE),--verbose $(VERBOSE)) $(if $(CONFIRM),--confirm-large) \
	$(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(WORKERS),--workers $(WORKERS)) \
	$(if $(SHARD),--shard $(SHARD)) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

.DEFAULT_GOAL := help
.PHONY: help venv dataset train report test bench bench-noise tensorboard clean

## help: list the targets
help:
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  make /'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

## venv: create .venv and install the project (done on first use by every target)
venv: $(STAMP)

## dataset: install Fashion-MNIST from Debian (dataset-fashion-mnist) when it is missing
dataset:
	@if [ ! -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "Fashion-MNIST is missing: installing the Debian package dataset-fashion-mnist"; \
	    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) || \
	    echo "warning: could not install dataset-fashion-mnist; training will look for other copies"; \
	  else \
	    echo "note: Fashion-MNIST not in $(FASHION_DIR); run 'sudo apt-get install dataset-fashion-mnist' or pass DATA=PATH"; \
	  fi; \
	fi

## train: train EXPERIMENT (default lab) into LOGDIR; also DATASET= EPOCHS= LIMIT= DATA= VERBOSE=1
##        WORKERS=N (local processes), EXECUTOR=ray RAY_ADDRESS=auto, SHARD=i/n
train: $(STAMP) dataset
	$(BIN)/python -m trainer $(TRAIN_ARGS)

## report: turn LOGDIR/EXPERIMENT into REPORTS/EXPERIMENT (report.pdf, report.html, CSVs); FORMAT=pdf,html
report: $(STAMP)
	$(BIN)/python -m report --logdir $(LOGDIR)/$(EXPERIMENT) --out $(REPORTS)/$(EXPERIMENT) \
	  $(if $(FORMAT),--format $(FORMAT)) $(if $(TEMPLATE),--template $(TEMPLATE)) \
	  $(if $(SUMMARY),--summary $(SUMMARY)) $(if $(SMOOTHING),--smoothing $(SMOOTHING)) \
	  $(if $(TARGET_LOSS),--target-loss $(TARGET_LOSS))

## test: run the test suite (no downloads; trains tiny real models)
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## bench: plain model.fit vs our trainer on EXPERIMENT's grid, then the report parse cache; QUICK=1 reduced
bench: $(STAMP) dataset
	$(BIN)/python -m bench.report_speed --logdir $(LOGDIR)/$(EXPERIMENT)
	$(BIN)/python -m bench.grid_speed --experiment $(EXPERIMENT) $(if $(QUICK),--quick) \
	  $(if $(WORKERS),--workers $(WORKERS)) $(if $(DATA),--data $(DATA))

## bench-noise: training time with [gradient_noise] off vs on, every run of EXPERIMENT twice; QUICK=1 reduced
bench-noise: $(STAMP) dataset
	$(BIN)/python -m bench.noise_overhead --experiment $(EXPERIMENT) $(if $(QUICK),--quick) $(if $(DATA),--data $(DATA))

## tensorboard: live view of LOGDIR, every point kept
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir $(LOGDIR) --samples_per_plugin scalars=0

## clean: remove logs and reports (keeps the virtual environment)
clean:
	rm -rf $(LOGDIR)/*/ $(REPORTS)
