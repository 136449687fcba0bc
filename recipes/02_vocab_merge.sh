#!/usr/bin/env bash
# 02 — Merge the Chinese pieces into the base LLaMA tokenizer, then compare the two.
#
# What it does:   zhllama vocab merge --base BASE_TOKENIZER --add chinese_sp.model -> $WORK/tokenizer
#                 zhllama vocab stats (tokens per character before/after) -> $WORK/vocab_stats.json
# Prerequisites:  01_vocab_train.sh; the base model's tokenizer.model (BASE_TOKENIZER).
# Variables:      WORDS, STATS_CORPUS below; paths in recipes/config.sh.
#
# The base pieces 0..31999 keep their ids, scores and types; only CJK pieces are added, with
# scores below every base score, so English and digits encode exactly as LLaMA did. No pad
# token is added (Chinese-LLaMA's 49953 vs 49954 mix-ups came from one).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${WORDS=}"                     # optional file of whole words to add, one per line
: "${STATS_CORPUS=$VOCAB_CORPUS}" # text to measure tokens per character on

words_flag=()
[[ -n "$WORDS" ]] && words_flag=(--words "$WORDS")

# shellcheck disable=SC2086
run $ZHLLAMA vocab merge \
    --base "$BASE_TOKENIZER" \
    --add "$WORK/chinese_sp/chinese_sp.model" \
    "${words_flag[@]}" \
    --out "$WORK/tokenizer" \
    $OVERWRITE

# shellcheck disable=SC2086
run $ZHLLAMA vocab stats \
    --tokenizer "$BASE_TOKENIZER" \
    --tokenizer "$WORK/tokenizer" \
    $STATS_CORPUS \
    --json "$WORK/vocab_stats.json"
