#!/usr/bin/env bash
# 05 — Instruction-tune the pretrained chain with LoRA.
#
# What it does:   zhllama sft  $WORK/extended + stage1 + stage2 + SFT_DATA -> $WORK/sft
#                 (LoRA adapter + the new rows, tokenizer with the chat template built in)
# Prerequisites:  04_pretrain.sh; SFT_DATA in recipes/config.sh.
# Variables:      below; LAUNCH / PRECISION / TRAIN_EXTRA in recipes/config.sh.
#
# Defaults follow Chinese-LLaMA-Alpaca-2's published scripts/training/run_sft.sh for
# Chinese-Alpaca-2-7B: learning rate 1e-4, LoRA rank 64, alpha 128, dropout 0.05 on
# q,k,v,o,gate,down,up with embeddings and LM head trainable; max sequence length 1024;
# per-device batch 1 with gradient accumulation 8; cosine schedule, warmup ratio 0.03, no
# weight decay; one epoch. Template: Llama-2-chat's [INST] format with Chinese-Alpaca-2's
# system prompt.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${TEMPLATE=llama2-chat}"      # alpaca | chinese-alpaca | llama2-chat | ziya
: "${SFT_LR=1e-4}"
: "${SFT_LORA_R=64}"
: "${SFT_LORA_ALPHA=128}"
: "${SFT_LORA_DROPOUT=0.05}"
: "${MAX_SEQ_LENGTH=1024}"
: "${SFT_BATCH_SIZE=1}"          # per device
: "${SFT_GRAD_ACCUM=8}"
: "${SFT_EPOCHS=1}"
: "${SFT_MAX_STEPS=}"            # a number overrides SFT_EPOCHS
: "${SFT_WARMUP_RATIO=0.03}"     # fraction of the steps
: "${SAVE_STEPS=200}"
: "${LOGGING_STEPS=10}"
: "${GRADIENT_CHECKPOINTING=--gradient-checkpointing}"

budget=(--num-train-epochs "$SFT_EPOCHS")
[[ -n "$SFT_MAX_STEPS" ]] && budget+=(--max-steps "$SFT_MAX_STEPS")

# shellcheck disable=SC2086  # LAUNCH, PRECISION, OVERWRITE, TRAIN_EXTRA split into words
run $LAUNCH sft \
    --model "$WORK/extended" \
    --adapter "$WORK/stage1" \
    --adapter "$WORK/stage2" \
    --data $SFT_DATA \
    --template "$TEMPLATE" \
    --out "$WORK/sft" \
    --max-seq-length "$MAX_SEQ_LENGTH" \
    --lora-r "$SFT_LORA_R" --lora-alpha "$SFT_LORA_ALPHA" --lora-dropout "$SFT_LORA_DROPOUT" \
    --learning-rate "$SFT_LR" \
    --per-device-train-batch-size "$SFT_BATCH_SIZE" \
    --gradient-accumulation-steps "$SFT_GRAD_ACCUM" \
    "${budget[@]}" \
    --lr-scheduler-type cosine \
    --warmup-steps "$SFT_WARMUP_RATIO" \
    --weight-decay 0 \
    --logging-steps "$LOGGING_STEPS" \
    --save-steps "$SAVE_STEPS" \
    --save-total-limit 3 \
    $PRECISION $GRADIENT_CHECKPOINTING $OVERWRITE $TRAIN_EXTRA
