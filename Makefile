# Lab-report generator: train a grid of Keras runs, watch it in TensorBoard, write the report.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXPERIMENT ?= lab
LOGDIR ?= logs
REPORTS ?= reports
PORT ?= 6006
HOST ?= localhost
FASHION_DIR := /usr/share/datasets/fashion-mnist
TEX_PACKAGES := texlive-latex-base texlive-latex-recommended latexmk
# The cleaner needs only the standard library: it runs before the venv exists.
CLEAN_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

TRAIN_ARGS := --experiment $(EXPERIMENT) --logdir $(LOGDIR) \
	$(if $(DATASET),--dataset $(DATASET)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(DATA),--data $(DATA)) \
	$(if $(VERBOSE),--verbose $(VERBOSE)) $(if $(CONFIRM),--confirm-large) \
	$(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(WORKERS),--workers $(WORKERS)) \
	$(if $(SHARD),--shard $(SHARD)) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) \
	$(if $(filter 0,$(NOISE)),--no-gradient-noise)
REPORT_ARGS := --logdir $(LOGDIR)/$(EXPERIMENT) --out $(REPORTS)/$(EXPERIMENT) \
	$(if $(FORMAT),--format $(FORMAT)) $(if $(TEMPLATE),--template $(TEMPLATE)) \
	$(if $(SUMMARY),--summary $(SUMMARY)) $(if $(SMOOTHING),--smoothing $(SMOOTHING)) \
	$(if $(TARGET_LOSS),--target-loss $(TARGET_LOSS)) $(if $(STRICT),--final) \
	$(if $(AUTHOR),--author "$(AUTHOR)") $(if $(STUDENT_ID),--student-id "$(STUDENT_ID)") \
	$(if $(DATE),--date "$(DATE)") $(if $(VERBOSE),--verbose)
BENCH_ARGS := --experiment $(EXPERIMENT) $(if $(QUICK),--quick) $(if $(WORKERS),--workers $(WORKERS)) \
	$(if $(DATA),--data $(DATA)) $(if $(DATASET),--dataset $(DATASET)) $(if $(EPOCHS),--epochs $(EPOCHS)) \
	$(if $(LIMIT),--limit $(LIMIT)) $(if $(PRECISION),--precision $(PRECISION))

.DEFAULT_GOAL := help
.PHONY: help venv dataset tex train report test bench bench-report bench-noise tensorboard clean

## help: list the targets and the variables they take
help:
	@awk '/^## [a-z-]+:/ { sub(/^## /, ""); n = index($$0, ":"); printf "  make %-13s %s\n", substr($$0, 1, n - 1), substr($$0, n + 2); next } \
	     /^##   / { sub(/^##   /, ""); printf "  %-18s %s\n", "", $$0 }' $(MAKEFILE_LIST)
	@echo "Variables: EXPERIMENT (lab) LOGDIR (logs) REPORTS (reports) VERBOSE=1 (TensorFlow's own start-up lines too)"

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

## train: train EXPERIMENT into LOGDIR/EXPERIMENT; DATASET= EPOCHS= LIMIT= DATA=PATH VERBOSE=1 NOISE=0 (no noise probe) CONFIRM=1
##   (grids over 500 runs); WORKERS=N local processes, EXECUTOR=ray RAY_ADDRESS=auto, SHARD=i/n
train: $(STAMP) dataset
	$(BIN)/python -m trainer $(TRAIN_ARGS)

## report: LOGDIR/EXPERIMENT → REPORTS/EXPERIMENT (report.pdf, report.html, tables/*.csv); FORMAT=pdf,html,latex
##   TEMPLATE=lab|task|results SUMMARY=final|best|last-K SMOOTHING=w (0.6; 0 raw) TARGET_LOSS=x
##   AUTHOR="…" STUDENT_ID=… DATE=… (the title block); STRICT=1 fails on an
##   unfinished grid instead of marking the report DRAFT
report: $(STAMP)
	$(BIN)/python -m report $(REPORT_ARGS)

## tex: install pdflatex and latexmk from Debian when missing (FORMAT=latex output compiles with them)
tex:
	@if ! command -v latexmk >/dev/null 2>&1 || ! command -v pdflatex >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "TeX is missing: installing texlive-latex-base, texlive-latex-recommended and latexmk from Debian"; \
	    (apt-get install -y -q --no-install-recommends $(TEX_PACKAGES) >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(TEX_PACKAGES) >/dev/null)) || \
	    echo "warning: could not install TeX; the test that compiles report.tex is skipped"; \
	  else \
	    echo "note: no pdflatex/latexmk; run 'sudo apt-get install $(TEX_PACKAGES)' to compile FORMAT=latex output"; \
	  fi; \
	fi

## test: run the test suite (no downloads of data; trains tiny real models; installs TeX as `make tex`)
test: $(STAMP) tex
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## bench: documents' plain model.fit vs our trainer on EXPERIMENT's grid, in temporary folders;
##   QUICK=1 reduced (6,000 images, 2 epochs), DATASET=, EPOCHS=, LIMIT=, PRECISION=float32,bfloat16, WORKERS=N, DATA=PATH
bench: $(STAMP) dataset
	$(BIN)/python -m bench.grid_speed $(BENCH_ARGS)

## bench-report: tbparse's default read vs the report's cached loader, on LOGDIR/EXPERIMENT (train it first)
bench-report: $(STAMP)
	$(BIN)/python -m bench.report_speed --logdir $(LOGDIR)/$(EXPERIMENT)

## bench-noise: training time with [gradient_noise] off vs on, every run of EXPERIMENT twice; QUICK=1 reduced, REPEAT=3 rounds
bench-noise: $(STAMP) dataset
	$(BIN)/python -m bench.noise_overhead --experiment $(EXPERIMENT) $(if $(QUICK),--quick) $(if $(DATA),--data $(DATA)) $(if $(REPEAT),--repeat $(REPEAT))

## tensorboard: live view of LOGDIR at http://HOST:PORT (localhost:6006), every point kept
tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir $(LOGDIR) --host $(HOST) --port $(PORT) --samples_per_plugin scalars=0

## clean: remove EXPERIMENT's logs and report (ALL=1: every experiment's); only folders the
##   trainer or the report made, never LOGDIR or REPORTS themselves; says what it removed
clean:
	@$(CLEAN_PYTHON) -m trainer.clean --logdir $(LOGDIR) --reports $(REPORTS) \
	  $(if $(ALL),--all,--experiment $(EXPERIMENT))
