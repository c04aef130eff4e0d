# normgrowth: every target sets up its own environment first (python3 -m venv + pip), nothing else needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NG := $(VENV)/bin/normgrowth
STAMP := $(VENV)/.installed
# Override to install another torch build, e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>".
TORCH_SPEC ?= torch==2.13.0

# ---- figures pipeline -------------------------------------------------------------------------
# MODELS: hub names or local checkpoint directories. Default: the offline pair built by `normgrowth zoo build`.
ZOO ?= zoo
ZOO_SEEDS ?= 1
RESULTS ?= results
FIGURES ?= figures
DATA ?= builtin
N_SEQS ?= 64
SEQ_LEN ?= 128
PAPER_MODELS := distilgpt2 gpt2 gpt2-medium gpt2-large gpt2-xl \
	facebook/opt-125m facebook/opt-1.3b facebook/opt-2.7b \
	EleutherAI/gpt-neo-125M EleutherAI/gpt-neo-1.3B EleutherAI/gpt-neo-2.7B \
	EleutherAI/pythia-70m EleutherAI/pythia-160m EleutherAI/pythia-410m EleutherAI/pythia-1b \
	EleutherAI/pythia-1.4b EleutherAI/pythia-2.8b \
	apollo-research/gpt2_noLN schaeff/gpt2-small_LNFree300 schaeff/gpt2-medium_LNFree500 \
	schaeff/gpt2-large_LNFree600 schaeff/gpt2-xl_LNFree800
# PRESET=landscape: 37 public checkpoints of 23 decoder families, 70M-8B parameters, every norm placement
# (pre, peri: Gemma 2/3, post: OLMo 2); gated checkpoints (Llama 3.2, Gemma) need a hub token.
LANDSCAPE_MODELS := gpt2 gpt2-medium EleutherAI/pythia-70m EleutherAI/pythia-410m EleutherAI/pythia-1.4b \
	facebook/opt-125m facebook/opt-1.3b EleutherAI/gpt-neo-125M EleutherAI/gpt-j-6b \
	bigscience/bloom-560m bigscience/bloom-1b7 tiiuae/falcon-rw-1b tiiuae/falcon-7b \
	stabilityai/stablelm-2-1_6b TinyLlama/TinyLlama_v1.1 meta-llama/Llama-3.2-1B mistralai/Mistral-7B-v0.1 \
	Qwen/Qwen2-0.5B Qwen/Qwen2.5-0.5B Qwen/Qwen2.5-1.5B Qwen/Qwen2.5-7B \
	Qwen/Qwen3-0.6B Qwen/Qwen3-1.7B Qwen/Qwen3-8B \
	google/gemma-2b google/gemma-2-2b google/gemma-3-1b-pt \
	allenai/OLMo-1B-hf allenai/OLMo-2-0425-1B allenai/OLMo-2-1124-7B allenai/OLMoE-1B-7B-0924 \
	microsoft/phi-1_5 microsoft/phi-2 microsoft/Phi-3-mini-4k-instruct \
	ibm-granite/granite-3.0-2b-base bigcode/starcoder2-3b bigcode/gpt_bigcode-santacoder
# Sweeps over training checkpoints: SWEEP (parent folders of step-<N> checkpoints or hub names) at SWEEP_REVISIONS.
PAPER_SWEEP := EleutherAI/pythia-160m EleutherAI/pythia-410m
PAPER_REVISIONS := step0,step1,step4,step16,step64,step256,step512,step2000,step8000,step23000,step64000,step143000
ZOO_MODELS := $(ZOO)/ln $(ZOO)/noln $(ZOO)/control
ifeq ($(PRESET),paper)
MODELS ?= $(PAPER_MODELS)
COMPARE ?= gpt2 apollo-research/gpt2_noLN
SWEEP ?= $(PAPER_SWEEP)
SWEEP_REVISIONS ?= $(PAPER_REVISIONS)
endif
ifeq ($(PRESET),landscape)
MODELS ?= $(LANDSCAPE_MODELS)
COMPARE ?= google/gemma-2-2b allenai/OLMo-2-0425-1B
SWEEP ?= $(PAPER_SWEEP)
SWEEP_REVISIONS ?= $(PAPER_REVISIONS)
endif
MODELS ?= $(ZOO_MODELS)
# the offline models: the headline comparison is the LN-free twin against the control (same fine-tuning, LN kept)
ifeq ($(strip $(MODELS)),$(strip $(ZOO_MODELS)))
COMPARE ?= $(ZOO)/control $(ZOO)/noln
endif
COMPARE ?= $(word 1,$(MODELS)) $(word 2,$(MODELS))
SWEEP ?= $(ZOO)/train
SWEEP_REVISIONS ?=
COMMON := --data $(DATA) --n-seqs $(N_SEQS) --seq-len $(SEQ_LEN) --out $(RESULTS)/cache

slug = $(subst /,__,$(1))
unslug = $(subst __,/,$(1))
MODEL_DIRS := $(foreach m,$(MODELS),$(RESULTS)/models/$(call slug,$(m)))
REPORTS := $(addsuffix /report.json,$(MODEL_DIRS))
WEIGHTS := $(addsuffix /weights.json,$(MODEL_DIRS))
DELETIONS := $(addsuffix /deletion.json,$(MODEL_DIRS))
ZOO_DEP := $(if $(filter $(ZOO)/%,$(MODELS) $(COMPARE) $(SWEEP)),$(ZOO)/zoo.json,)
ZOO_RECORD := $(if $(ZOO_DEP),$(RESULTS)/zoo.json,)
# with the offline triple, also the uncontrolled comparison (LN model against its twin) as a third row
EXTRA_COMPARE := $(if $(filter $(COMPARE),$(ZOO)/control),$(RESULTS)/compare-ln.json,)

.PHONY: setup test test-slow figures results bench zoo clean help

help:
	@echo "make test      set up .venv and run the test suite (offline; tests marked slow are left out)"
	@echo "make test-slow the tests marked slow (the benchmark's full quick sweep, minutes)"
	@echo "make figures   set up, build the offline model pair, collect results, draw figures/"
	@echo "               MODELS=\"a b\" selects models; PRESET=paper the 2023 study's models and a Pythia"
	@echo "               sweep over training (needs the hub); ZOO_SEEDS=n trains n offline triples"
	@echo "               PRESET=landscape 37 checkpoints of 23 decoder families, 70M-8B (needs the hub)"
	@echo "make bench     benchmark collection against plain forward passes (QUICK=1 for a short run)"
	@echo "make clean     remove generated output (results/, figures/*.png|pdf; keeps the zoo)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

test-slow: $(STAMP)
	$(PY) -m pytest tests -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench.py $(if $(QUICK),--quick,--rounds 3)

zoo: $(ZOO)/zoo.json

$(ZOO)/zoo.json: | $(STAMP)
	$(NG) zoo build --out $(ZOO) --seeds $(ZOO_SEEDS)

$(RESULTS)/zoo.json: $(ZOO)/zoo.json
	mkdir -p $(RESULTS)
	cp $(ZOO)/zoo.json $@
	if [ -f $(ZOO)/seeds.json ]; then cp $(ZOO)/seeds.json $(RESULTS)/seeds.json; fi

$(RESULTS)/models/%/report.json: $(ZOO_DEP) | $(STAMP)
	$(NG) report $(call unslug,$*) $(COMMON) --json $@

$(RESULTS)/models/%/weights.json: $(ZOO_DEP) | $(STAMP)
	$(NG) weights $(call unslug,$*) $(COMMON) --json $@

$(RESULTS)/models/%/deletion.json: $(ZOO_DEP) | $(STAMP)
	$(NG) deletion $(call unslug,$*) $(COMMON) --json $@

$(RESULTS)/compare.json: $(ZOO_DEP) | $(STAMP)
	$(NG) compare $(COMPARE) $(COMMON) --json $@

$(RESULTS)/compare-ln.json: $(ZOO_DEP) | $(STAMP)
	$(NG) compare $(ZOO)/ln $(ZOO)/noln $(COMMON) --json $@

$(RESULTS)/sweep.json: $(ZOO_DEP) | $(STAMP)
	$(NG) sweep $(SWEEP) $(if $(SWEEP_REVISIONS),--revisions $(SWEEP_REVISIONS),) $(COMMON) --json $@

results: $(REPORTS) $(WEIGHTS) $(DELETIONS) $(RESULTS)/compare.json $(RESULTS)/sweep.json $(ZOO_RECORD) $(EXTRA_COMPARE)

figures: $(FIGURES)/.done

$(FIGURES)/.done: $(REPORTS) $(WEIGHTS) $(DELETIONS) $(RESULTS)/compare.json $(RESULTS)/sweep.json $(ZOO_RECORD) \
		$(EXTRA_COMPARE) $(wildcard analyses/*.py) | $(STAMP)
	$(PY) analyses/all.py --results $(RESULTS) --out $(FIGURES)
	touch $@

clean:
	rm -rf $(RESULTS) $(FIGURES)/*.png $(FIGURES)/*.pdf $(FIGURES)/.done .pytest_cache

# ---- effective layer horizon (live and frozen norm scales) and the causal mean-ablation check ----
HORIZONS := $(addsuffix /horizon.json,$(MODEL_DIRS))

$(RESULTS)/models/%/horizon.json: $(ZOO_DEP) | $(STAMP)
	$(NG) horizon $(call unslug,$*) $(COMMON) --json $@

results: $(HORIZONS)
$(FIGURES)/.done: $(HORIZONS)
