#!/usr/bin/env bash
# 03 — Resize the base model to the merged tokenizer and initialise the new rows.
#
# What it does:   zhllama extend --model BASE_MODEL --tokenizer $WORK/tokenizer -> $WORK/extended
# Prerequisites:  02_vocab_merge.sh; the base model (BASE_MODEL).
# Variables:      INIT, PAD_TO_MULTIPLE_OF below; paths in recipes/config.sh.
#
# Memory: the whole model is loaded once in its own dtype (LLaMA-2-7B: ~13.5 GB in fp16, on
# CPU is fine). Original rows stay bit-identical; each new row starts as the mean of the rows
# of the pieces the base tokenizer splits its text into (subword-mean).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${INIT=subword-mean}"        # subword-mean | mean | random
: "${PAD_TO_MULTIPLE_OF=64}"    # rows padded for tensor-core friendly shapes

# shellcheck disable=SC2086
run $ZHLLAMA extend \
    --model "$BASE_MODEL" \
    --tokenizer "$WORK/tokenizer" \
    --out "$WORK/extended" \
    --init "$INIT" \
    --pad-to-multiple-of "$PAD_TO_MULTIPLE_OF" \
    $OVERWRITE
