#!/usr/bin/env bash
# 06 — Bake the adapter chain into one checkpoint and check it.
#
# What it does:   zhllama merge  $WORK/extended + stage1 + stage2 + sft -> $WORK/merged --verify
#                 then answers one prompt with the merged model (zhllama chat --prompt).
# Prerequisites:  05_sft.sh (or set ADAPTERS to merge a shorter chain, e.g. the pretrained model).
# Variables:      ADAPTERS, DTYPE, MAX_SHARD_SIZE, PROMPT below; paths in recipes/config.sh.
#
# Streams one shard at a time: peak memory is about one shard plus the adapters, not the
# model. --verify compares the merged model's logits with the adapter chain's on sample text.
# The result loads with plain transformers (AutoModelForCausalLM / AutoTokenizer), and its
# tokenizer_config.json carries the chat template the model was trained with.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${ADAPTERS=$WORK/stage1 $WORK/stage2 $WORK/sft}"  # the chain, in training order
: "${DTYPE=float16}"             # float16 | bfloat16 | float32 (Chinese-LLaMA-Alpaca ships fp16)
: "${MAX_SHARD_SIZE=2GB}"
: "${PROMPT=请用一句话介绍一下北京。}"
: "${MAX_NEW_TOKENS=128}"

adapter_flags=()
for adapter in $ADAPTERS; do
    adapter_flags+=(--adapter "$adapter")
done

# shellcheck disable=SC2086
run $ZHLLAMA merge \
    --model "$WORK/extended" \
    "${adapter_flags[@]}" \
    --out "$WORK/merged" \
    --dtype "$DTYPE" \
    --max-shard-size "$MAX_SHARD_SIZE" \
    --verify \
    $OVERWRITE

run $ZHLLAMA chat --model "$WORK/merged" --prompt "$PROMPT" --max-new-tokens "$MAX_NEW_TOKENS"
