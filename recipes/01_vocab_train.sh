#!/usr/bin/env bash
# 01 — Train a Chinese SentencePiece model on your corpus.
#
# What it does:   zhllama vocab train  VOCAB_CORPUS -> $WORK/chinese_sp/chinese_sp.model
# Prerequisites:  a Chinese text corpus (CORPUS / VOCAB_CORPUS in recipes/config.sh).
# Variables:      VOCAB_SIZE, MODEL_TYPE, JIEBA, MAX_SENTENCES below; paths in recipes/config.sh.
#
# Chinese-LLaMA trained a 20,000-piece Chinese SentencePiece model (unigram) and merged it
# into LLaMA's 32,000 pieces, giving 49,953 (Cui, Yang & Yao 2023, arXiv:2304.08177;
# ymcui/Chinese-LLaMA-Alpaca scripts/merge_tokenizer). We keep the 20,000 pieces but default
# to BPE, which merges cleanly into LLaMA's BPE model (see docs/vocab.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

: "${VOCAB_SIZE=20000}"       # pieces in the Chinese model (Chinese-LLaMA: 20000)
: "${MODEL_TYPE=bpe}"         # bpe | unigram (Chinese-LLaMA used unigram)
: "${JIEBA=}"                 # set to --jieba to keep pieces inside jieba word boundaries
: "${MAX_SENTENCES=2000000}"  # lines sampled from the corpus (uniformly, bounded memory)

# shellcheck disable=SC2086  # JIEBA and OVERWRITE are flags or empty
run $ZHLLAMA vocab train $VOCAB_CORPUS \
    --out "$WORK/chinese_sp" \
    --vocab-size "$VOCAB_SIZE" \
    --model-type "$MODEL_TYPE" \
    --max-sentences "$MAX_SENTENCES" \
    $JIEBA $OVERWRITE
