# shellcheck shell=bash
# Shared settings of the recipes: where the inputs are and where the outputs go.
# Every recipe sources this file first. Edit the defaults here, or override any of them from
# the environment, e.g.  BASE_MODEL=/models/Llama-2-13b-hf WORK=runs/13b bash recipes/run_all.sh
# An empty value counts as set: PRECISION= bash recipes/04_pretrain.sh trains in fp32.
#
# Defaults are for LLaMA-2-7B on one GPU box; README.md ("Using your own LLaMA-2-7B") lists
# the estimated time and memory of each step.

# --- inputs -------------------------------------------------------------------------------
# A Hugging Face LLaMA / Llama-2 checkpoint directory (config.json, *.safetensors, tokenizer.model).
: "${BASE_MODEL=models/Llama-2-7b-hf}"
# The base tokenizer: a directory holding tokenizer.model, or the tokenizer.model file itself.
: "${BASE_TOKENIZER=$BASE_MODEL}"
# Chinese pretraining corpus: .txt (one document per line), .jsonl/.json (field "text"),
# .parquet, optionally .gz; a file, a directory or a glob.
: "${CORPUS=data/pretrain}"
# A sample of the corpus for training the Chinese SentencePiece model (the whole corpus works
# too; vocab train samples at most --max-sentences lines).
: "${VOCAB_CORPUS=$CORPUS}"
# Instruction data: Alpaca records or ShareGPT/OpenAI conversations, JSON or JSONL.
: "${SFT_DATA=data/sft}"

# --- outputs ------------------------------------------------------------------------------
# One directory per step below WORK: chinese_sp, tokenizer, extended, stage1, stage2, sft, merged.
: "${WORK=runs/llama2-7b-zh}"

# --- how to run ---------------------------------------------------------------------------
# The zhllama command (e.g. ".venv/bin/zhllama" when not on PATH).
: "${ZHLLAMA=zhllama}"
# The command that runs training steps (pretrain, sft). Several GPUs or nodes:
#   LAUNCH="accelerate launch --config_file recipes/accelerate/deepspeed-zero2.yaml -m zhllama"
: "${LAUNCH=$ZHLLAMA}"
# Mixed precision flag for training: --bf16 on A100/H100, --fp16 on V100/T4, empty on CPU.
: "${PRECISION=--bf16}"
# Set to --overwrite to replace the outputs of an earlier run (each step refuses otherwise).
: "${OVERWRITE=}"
# Extra TrainingArguments flags for every training step, e.g. "--max-steps 100" for a trial run.
: "${TRAIN_EXTRA=}"

mkdir -p "$WORK"

# Print a command, then run it (so the log shows exactly what ran).
run() {
    echo "+ $*" >&2
    "$@"
}
