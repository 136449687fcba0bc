#!/usr/bin/env bash
# 03 — Resize the base model to the merged tokenizer and initialise the new rows.
#
# What it does:   zhllama extend --model BASE_MODEL --tokenizer $WORK/tokenizer -> $WORK/extended
# Prerequisites:  02_vocab_merge.sh; the base model (BASE_MODEL).
# Variables:      INIT, INIT_CORPUS, PAD_TO_MULTIPLE_OF below; paths in recipes/config.sh.
#
# Original rows stay bit-identical; each new row starts as the mean of the rows of the pieces
# the base tokenizer splits its text into (subword-mean), then stage 0 trains only the new rows
# on INIT_CORPUS with everything else frozen (docs/pretrain.md, "How the new rows start").
# Stage 0 runs the whole model forward and backward for a few hundred small steps: minutes on
# a GPU, many hours on a CPU at 7B; there, set INIT_CORPUS= to skip it (the closed-form start
# loses more of the base model's Chinese at step 0, which stage 1 then has to win back).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${INIT=subword-mean}"        # subword-mean | mean | random
: "${PAD_TO_MULTIPLE_OF=64}"    # rows padded for tensor-core friendly shapes
: "${INIT_CORPUS=$VOCAB_CORPUS}" # Chinese text for stage 0 (empty: no stage 0)

init_corpus=()
if [[ -n "$INIT_CORPUS" && "$INIT" == subword-mean ]]; then
    init_corpus=(--init-corpus "$INIT_CORPUS")
fi

# shellcheck disable=SC2086
run $ZHLLAMA extend \
    --model "$BASE_MODEL" \
    --tokenizer "$WORK/tokenizer" \
    --out "$WORK/extended" \
    --init "$INIT" \
    "${init_corpus[@]}" \
    --pad-to-multiple-of "$PAD_TO_MULTIPLE_OF" \
    $OVERWRITE
