#!/usr/bin/env bash
# 07 — Preference-tune the SFT chain with DPO (LoRA), then bake the whole chain into one checkpoint.
#
# What it does:   zhllama dpo    $WORK/extended + stage1 + stage2 + sft + PREF_DATA -> $WORK/dpo
#                 (LoRA adapter; the reference is the chain without it, adapters disabled)
#                 zhllama merge  the chain including $WORK/dpo -> $WORK/merged_dpo (--verify)
# Prerequisites:  05_sft.sh; PREF_DATA (pairs: trl {prompt, chosen, rejected} or LLaMA-Factory's
#                 ShareGPT preference format, JSON or JSONL); PREF_VALIDATION_DATA optional.
# Variables:      below; LAUNCH / PRECISION / TRAIN_EXTRA in recipes/config.sh.
#
# Defaults follow LLaMA-Factory's LoRA DPO example (examples/train_lora/llama3_lora_dpo.yaml):
# sigmoid loss, beta 0.1, learning rate 5e-6, cosine schedule with warmup 0.1, one-ish epoch
# (here 1), per-device batch 1 with gradient accumulation 8; LoRA as in 05_sft.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${PREF_DATA=data/preference}"
: "${PREF_VALIDATION_DATA=}"     # held-out pairs: margins and accuracy before and after
: "${TEMPLATE=llama2-chat}"      # the template 05_sft.sh used
: "${DPO_BETA=0.1}"
: "${DPO_LOSS=sigmoid}"          # sigmoid | ipo | hinge | robust | ... (zhllama dpo --help)
: "${DPO_LR=5e-6}"
: "${DPO_LORA_R=64}"
: "${DPO_LORA_ALPHA=128}"
: "${DPO_MAX_LENGTH=1024}"
: "${DPO_MAX_PROMPT_LENGTH=512}"
: "${DPO_BATCH_SIZE=1}"          # per device, in pairs
: "${DPO_GRAD_ACCUM=8}"
: "${DPO_EPOCHS=1}"
: "${DPO_MAX_STEPS=}"            # a number overrides DPO_EPOCHS
: "${DPO_WARMUP_RATIO=0.1}"
: "${SAVE_STEPS=200}"
: "${LOGGING_STEPS=10}"
: "${DTYPE=float16}"             # of the merged checkpoint, as in 06_merge.sh

budget=(--num-train-epochs "$DPO_EPOCHS")
[[ -n "$DPO_MAX_STEPS" ]] && budget+=(--max-steps "$DPO_MAX_STEPS")
held_out=()
[[ -n "$PREF_VALIDATION_DATA" ]] && held_out=(--validation-data $PREF_VALIDATION_DATA --eval-strategy steps --eval-steps "$SAVE_STEPS")

# shellcheck disable=SC2086  # LAUNCH, PREF_DATA, PRECISION, OVERWRITE, TRAIN_EXTRA split into words
run $LAUNCH dpo \
    --model "$WORK/extended" \
    --adapter "$WORK/stage1" \
    --adapter "$WORK/stage2" \
    --adapter "$WORK/sft" \
    --data $PREF_DATA \
    "${held_out[@]}" \
    --template "$TEMPLATE" \
    --out "$WORK/dpo" \
    --beta "$DPO_BETA" --loss-type "$DPO_LOSS" \
    --max-length "$DPO_MAX_LENGTH" --max-prompt-length "$DPO_MAX_PROMPT_LENGTH" \
    --lora-r "$DPO_LORA_R" --lora-alpha "$DPO_LORA_ALPHA" \
    --learning-rate "$DPO_LR" \
    --per-device-train-batch-size "$DPO_BATCH_SIZE" \
    --gradient-accumulation-steps "$DPO_GRAD_ACCUM" \
    "${budget[@]}" \
    --lr-scheduler-type cosine \
    --warmup-steps "$DPO_WARMUP_RATIO" \
    --weight-decay 0 \
    --logging-steps "$LOGGING_STEPS" \
    --save-steps "$SAVE_STEPS" \
    $PRECISION $OVERWRITE $TRAIN_EXTRA

# shellcheck disable=SC2086
run $ZHLLAMA merge \
    --model "$WORK/extended" \
    --adapter "$WORK/stage1" \
    --adapter "$WORK/stage2" \
    --adapter "$WORK/sft" \
    --adapter "$WORK/dpo" \
    --out "$WORK/merged_dpo" \
    --dtype "$DTYPE" \
    --verify $OVERWRITE
