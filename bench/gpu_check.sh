#!/usr/bin/env bash
# GPU check: zhllama's training path on one CUDA GPU, from a fresh clone, in a few minutes.
#
# What it does: installs zhllama with --no-deps over the machine's own torch / transformers /
# accelerate (plus the few packages such a box lacks, from wheels brought along), prints the
# versions, then runs bench/train.py on a LLaMA-2-7B-shaped model with 2 of its layers (random
# bf16 weights, the LLaMA tokenizer extended with Chinese-LLaMA's 20k pieces): the
# `extend --head-init logprob` pass, stage 1, stage 2 in bf16, stage 2 with --load-in-4bit, and
# SFT, each printing tokens/s, MFU (6 x parameters x tokens/s over the GPU's bf16 peak) and peak
# GPU memory. Exits non-zero on any failure.
#
# Prerequisites: python3 with torch (CUDA), transformers, accelerate, peft, sentencepiece,
# tokenizers, safetensors, pyyaml, tqdm, matplotlib, pyarrow, pandas; the rest comes from --bring.
#
#   bench/gpu_check.sh --prepare DIR     # where pip reaches PyPI: wheels + assets into DIR
#   bench/gpu_check.sh --bring DIR       # on the GPU box (no network)
#   bench/gpu_check.sh --tiny            # the same logic on a tiny model, on CPU (4-bit: its refusal is checked)
#
# Variables: PYTHON (default python3), LAYERS (2), STEPS (10), BATCH (4), BLOCK (1024), OUT (where
# the JSON table goes; default a temporary directory).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; *) PY=$(command -v "$PY") ;; esac  # absolute: the script changes directory
TINY=0
BRING=""
PREPARE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1 ;;
        --bring) BRING=$(cd "$2" && pwd); shift ;;
        --prepare) PREPARE=$2; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# Packages a GPU image with torch/transformers/accelerate/peft usually lacks, at the versions
# constraints.txt pins (bitsandbytes for --load-in-4bit; datasets and its two helpers; peft in case
# the box's is older than the trainable-token adapters need).
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2 bitsandbytes==0.50.2"
ASSET_FILES="tokenizers/llama/tokenizer.model tokenizers/chinese-llama/chinese_sp.model corpora/zh/hongloumeng.txt sft/ruozhiba_qa2449_zh.json"

if [ -n "$PREPARE" ]; then
    mkdir -p "$PREPARE/wheels" "$PREPARE/assets"
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$PREPARE/wheels" $WHEELS
    ASSETS=${ZHLLAMA_ASSETS:-$REPO/../shared/assets}
    for f in $ASSET_FILES; do mkdir -p "$PREPARE/assets/$(dirname "$f")"; cp "$ASSETS/$f" "$PREPARE/assets/$f"; done
    du -sh "$PREPARE"
    exit 0
fi

START=$(date +%s)
SCRATCH=$(mktemp -d -t zhllama-gpu-check-XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
SITE="$SCRATCH/site"
OUT=${OUT:-$SCRATCH}

echo "== install (zhllama --no-deps over this machine's packages)"
if [ -n "$BRING" ] && compgen -G "$BRING/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$BRING"/wheels/*.whl
fi
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" "$REPO"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -n "$BRING" ] && [ -d "$BRING/assets" ]; then export ZHLLAMA_ASSETS="$BRING/assets"; fi
cd "$SCRATCH"  # not the repository: `import zhllama` must find the installed package

"$PY" - "$SITE" <<'EOF'
import importlib, sys
import zhllama
if not zhllama.__file__.startswith(sys.argv[1]):
    sys.exit(f"zhllama imported from {zhllama.__file__}, not the fresh install")
import zhllama.pretrain.train, zhllama.sft.train  # the stage modules import with these versions
versions = {}
for name in ("torch", "transformers", "tokenizers", "peft", "accelerate", "datasets", "sentencepiece", "numpy", "bitsandbytes"):
    try:
        versions[name] = importlib.import_module(name).__version__
    except ImportError:
        versions[name] = "missing"
import torch
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()), "| device:", device)
EOF

if [ "$TINY" = 1 ]; then
    SIZE=(--tiny-vocab --hidden 64 --layers "${LAYERS:-1}")
    RUN=(--steps "${STEPS:-3}" --batch-size "${BATCH:-2}" --block-size "${BLOCK:-32}")
else
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (use --tiny on CPU)')"
    SIZE=(--shape 7b --layers "${LAYERS:-2}")
    RUN=(--steps "${STEPS:-10}" --batch-size "${BATCH:-4}" --block-size "${BLOCK:-1024}")
fi

echo "== pipeline: extend --head-init logprob, stage 1, stage 2 (bf16 and 4-bit), SFT"
"$PY" "$REPO/bench/train.py" "${SIZE[@]}" "${RUN[@]}" --head-init logprob --ways zhllama \
    --stages stage1 stage2 stage2-4bit sft --json "$OUT/gpu_check.json"

echo "== gpu_check passed in $(( $(date +%s) - START )) s"
