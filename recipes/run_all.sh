#!/usr/bin/env bash
# The whole pipeline, step by step: 01 vocab train -> 02 vocab merge (+ stats) -> 03 extend
# -> 04 pretrain stage 1 and 2 -> 05 sft -> 06 merge (--verify) and one chat answer
# [-> 07 dpo + merge of the chain with it, when PREF_DATA is set].
#
# What it does:   runs recipes/01_*.sh ... 06_*.sh in order; each step's output directory is
#                 under $WORK (see recipes/config.sh). FROM=N resumes at step N. 07_dpo.sh runs
#                 only when PREF_DATA (preference pairs) is set.
# Prerequisites:  zhllama installed; BASE_MODEL, CORPUS and SFT_DATA set (recipes/config.sh).
# Variables:      everything in recipes/config.sh and in each step script, from the environment:
#                   BASE_MODEL=/models/Llama-2-7b-hf CORPUS=data/zh SFT_DATA=data/sft.json \
#                   WORK=runs/7b bash recipes/run_all.sh
#                 Several GPUs: LAUNCH="accelerate launch --config_file recipes/accelerate/deepspeed-zero2.yaml -m zhllama"
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
: "${FROM=1}"

for script in "$here"/0[1-7]_*.sh; do
    number=$(basename "$script" | cut -c1-2)
    if (( 10#$number < FROM )) || { [[ $number == 07 ]] && [[ -z "${PREF_DATA:-}" ]]; }; then
        continue
    fi
    echo "=== $(basename "$script")" >&2
    start=$SECONDS
    bash "$script"
    echo "=== $(basename "$script") done in $((SECONDS - start)) s" >&2
done
