"""Small Chinese preference pairs for the dpo and rm tests, in every supported format."""

from __future__ import annotations

import random

from zhllama.demo.tiny import chinese_number


def preference_records(count: int, *, seed: int = 0) -> list[dict]:
    """Arithmetic questions in Chinese: the chosen answer is right and plain, the rejected one is
    off by a few and hedged ("大概是…吧"), a difference a tiny model can learn in a few steps.
    Records cycle through trl strings, trl message lists (some multi-turn, with a system
    message) and LLaMA-Factory's ShareGPT preference format."""
    rng = random.Random(seed)
    records = []
    for i in range(count):
        a, b = rng.randint(1, 40), rng.randint(1, 40)
        question = f"{chinese_number(a)}加{chinese_number(b)}等于几？"
        right, wrong = f"等于{chinese_number(a + b)}。", f"大概是{chinese_number(a + b + rng.randint(1, 9))}吧。"
        kind = i % 3
        if kind == 0:
            records.append({"prompt": question, "chosen": right, "rejected": wrong})
        elif kind == 1:
            messages = [{"role": "system", "content": "你是一个会算数的助手。"}]
            if i % 2:
                messages += [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
            records.append({"prompt": messages + [{"role": "user", "content": question}],
                            "chosen": [{"role": "assistant", "content": right}],
                            "rejected": [{"role": "assistant", "content": wrong}]})  # fmt: skip
        else:
            records.append({"conversations": [{"from": "human", "value": question}],
                            "chosen": {"from": "gpt", "value": right}, "rejected": {"from": "gpt", "value": wrong}})  # fmt: skip
    return records
