#!/usr/bin/env bash
# 04 — Continue pretraining on Chinese text in two stages.
#
# What it does:   stage 1: zhllama pretrain --stage 1  $WORK/extended + CORPUS -> $WORK/stage1
#                          (only the new embedding / LM-head rows train; the adapter holds only them)
#                 stage 2: zhllama pretrain --stage 2  $WORK/extended + stage1 + CORPUS -> $WORK/stage2
#                          (LoRA on every attention and MLP projection, plus the new rows)
# Prerequisites:  03_extend.sh; CORPUS in recipes/config.sh.
# Variables:      below; LAUNCH / PRECISION / TRAIN_EXTRA in recipes/config.sh.
#                 Several GPUs: LAUNCH="accelerate launch --config_file recipes/accelerate/deepspeed-zero2.yaml -m zhllama"
#
# Defaults follow Chinese-LLaMA-Alpaca-2's published scripts/training/run_pt.sh for
# Chinese-LLaMA-2-7B: learning rate 2e-4, LoRA rank 64, alpha 128, dropout 0.05 on
# q,k,v,o,gate,down,up; block size 512; per-device batch 1 with gradient accumulation 8;
# cosine schedule, warmup ratio 0.05, weight decay 0.01; one epoch. Chinese-LLaMA (v1) ran the
# two-stage variant for its 7B base model (stage 1: embeddings only; arXiv:2304.08177 §4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${BLOCK_SIZE=512}"
: "${BATCH_SIZE=1}"              # per device
: "${GRAD_ACCUM=8}"
: "${EPOCHS=1}"
: "${MAX_STEPS=}"                # a number overrides EPOCHS (e.g. 1000 for a trial)
: "${WARMUP_RATIO=0.05}"         # fraction of the steps (transformers 5: --warmup-steps below 1)
: "${WEIGHT_DECAY=0.01}"
: "${STAGE1_LR=2e-4}"
: "${STAGE2_LR=2e-4}"
: "${LORA_R=64}"
: "${LORA_ALPHA=128}"
: "${LORA_DROPOUT=0.05}"
: "${SAVE_STEPS=200}"
: "${LOGGING_STEPS=10}"
: "${GRADIENT_CHECKPOINTING=--gradient-checkpointing}"  # empty to trade memory for speed

train_flags=(
    --block-size "$BLOCK_SIZE"
    --per-device-train-batch-size "$BATCH_SIZE"
    --gradient-accumulation-steps "$GRAD_ACCUM"
    --num-train-epochs "$EPOCHS"
    --lr-scheduler-type cosine
    --warmup-steps "$WARMUP_RATIO"
    --weight-decay "$WEIGHT_DECAY"
    --logging-steps "$LOGGING_STEPS"
    --save-steps "$SAVE_STEPS"
    --save-total-limit 3
)
[[ -n "$MAX_STEPS" ]] && train_flags+=(--max-steps "$MAX_STEPS")

# shellcheck disable=SC2086  # LAUNCH, PRECISION, OVERWRITE, TRAIN_EXTRA split into words
run $LAUNCH pretrain --stage 1 \
    --model "$WORK/extended" \
    --data $CORPUS \
    --out "$WORK/stage1" \
    --learning-rate "$STAGE1_LR" \
    "${train_flags[@]}" $PRECISION $GRADIENT_CHECKPOINTING $OVERWRITE $TRAIN_EXTRA

# shellcheck disable=SC2086
run $LAUNCH pretrain --stage 2 \
    --model "$WORK/extended" \
    --adapter "$WORK/stage1" \
    --data $CORPUS \
    --out "$WORK/stage2" \
    --learning-rate "$STAGE2_LR" \
    --lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" \
    "${train_flags[@]}" $PRECISION $GRADIENT_CHECKPOINTING $OVERWRITE $TRAIN_EXTRA
