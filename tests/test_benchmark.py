"""zhllama eval --benchmark cmmlu on the real CMMLU subjects: the files as published, the prompt
character for character, and per-question predictions equal to those of an independent
re-implementation written here (pandas + plain forward passes, nothing shared with
zhllama.evaluate), shot dropping included."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain_fixtures import run
from zhllama.evaluate.benchmarks import load_benchmark
from zhllama.evaluate.prompts import STYLES, build_prompt, format_shot

pytestmark = [pytest.mark.real_assets, pytest.mark.usefixtures("one_torch_thread")]

SUBJECTS = ("agronomy", "anatomy", "chinese_history", "chinese_literature", "computer_science",
            "elementary_chinese", "high_school_mathematics", "world_history")  # fmt: skip


@pytest.fixture(scope="module")
def cmmlu(assets):
    return assets / "benchmarks" / "cmmlu"


def test_real_cmmlu_files_load_as_published(cmmlu):
    subjects = load_benchmark("cmmlu", cmmlu, subjects=[], shots=5, limit=None)
    assert tuple(s.key for s in subjects) == SUBJECTS
    assert sum(len(s.scored) for s in subjects) == 1625 and all(len(s.dev) == 5 for s in subjects)
    anatomy = subjects[1]
    assert (anatomy.name, anatomy.categories) == ("解剖学", ("STEM",))
    assert subjects[2].categories == ("China specific", "Humanities")
    first = anatomy.dev[0]
    assert (first.question, first.choices, first.answer) == ("壁胸膜的分部不包括", ("肋胸膜", "肺胸膜", "膈胸膜", "胸膜顶"), "B")
    # cells are kept exactly as written, trailing spaces included
    maths = subjects[6].scored[0]
    assert maths.choices[0] == "{—1,0,1} " and maths.answer == "D"


def test_cmmlu_prompt_character_for_character(cmmlu):
    anatomy = load_benchmark("cmmlu", cmmlu, subjects=["anatomy"], shots=1, limit=1)[0]
    style = STYLES["cmmlu"]
    prompt = build_prompt(style, anatomy.name, anatomy.scored[0], [format_shot(style, anatomy.dev[0])], [1], fits=lambda *_: True)
    q = anatomy.scored[0]
    expected = (
        "以下是关于解剖学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：壁胸膜的分部不包括\nA. 肋胸膜\nB. 肺胸膜\nC. 膈胸膜\nD. 胸膜顶\n答案是：B\n\n"
        f"题目：{q.question}\nA. {q.choices[0]}\nB. {q.choices[1]}\nC. {q.choices[2]}\nD. {q.choices[3]}\n答案是："
    )
    assert prompt.context == expected
    assert prompt.continuations == {"A": "A", "B": "B", "C": "C", "D": "D"} and prompt.shots == 1


# --------------------------------------------------------------------------- the independent re-implementation


def reference_predictions(model_dir, cmmlu, subjects, *, shots: int, limit: int, max_length: int) -> list[dict]:
    """CMMLU scored the lm-evaluation-harness way, from scratch: pandas reads the CSVs, each
    (prompt, letter) is one unbatched forward pass over <s> + encode(prompt + letter)."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    names = json.loads((cmmlu / "subjects.json").read_text(encoding="utf-8"))

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def question_text(row):
        return f"题目：{row['Question']}\nA. {row['A']}\nB. {row['B']}\nC. {row['C']}\nD. {row['D']}\n答案是："

    found = []
    for subject in subjects:
        read = dict(index_col=0, dtype=str, keep_default_na=False)
        dev = pd.read_csv(cmmlu / "dev" / f"{subject}.csv", **read).head(shots)
        test = pd.read_csv(cmmlu / "test" / f"{subject}.csv", **read).head(limit)
        header = f"以下是关于{names[subject]['name_zh']}的单项选择题，请直接给出正确答案的选项。\n\n"
        examples = [question_text(row) + row["Answer"] + "\n\n" for _, row in dev.iterrows()]
        for index, (_, row) in enumerate(test.iterrows()):
            kept = list(examples)
            while True:  # drop the longest examples (all of that length) until <s> + prompt + letter fits
                prompt = header + "".join(kept) + question_text(row)
                if not kept or max(1 + len(encode(prompt + letter)) for letter in "ABCD") <= max_length:
                    break
                longest = max(len(encode(e)) for e in kept)
                kept = [e for e in kept if len(encode(e)) != longest]
            logprobs = {}
            for letter in "ABCD":
                context = encode(prompt)
                whole = [tokenizer.bos_token_id] + encode(prompt + letter)
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
                start = 1 + len(context)
                logprobs[letter] = sum(logits[i - 1, whole[i]].item() for i in range(start, len(whole)))
            prediction = max("ABCD", key=logprobs.get)
            found.append({"subject": subject, "index": index, "answer": row["Answer"], "prediction": prediction,
                          "logprobs": logprobs, "shots": len(kept)})  # fmt: skip
    return found


def test_predictions_match_an_independent_reimplementation(tmp_path, tiny_model_dir, cmmlu):
    """anatomy fits 5 shots into the tiny model's 1024 tokens; chinese_history and world_history
    (long passages, Chinese through byte fallback) do not and lose their longest shots."""
    subjects, limit = ["anatomy", "chinese_history", "world_history"], 4
    predictions, table = tmp_path / "predictions.jsonl", tmp_path / "cmmlu.json"
    run(["eval", "--model", tiny_model_dir, "--benchmark", "cmmlu", "--benchmark-dir", cmmlu, "--subjects", ",".join(subjects),
         "--limit", limit, "--batch-size", 3, "--predictions", predictions, "--json", table])  # fmt: skip
    ours = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    reference = reference_predictions(tiny_model_dir, cmmlu, subjects, shots=5, limit=limit, max_length=1024)
    assert [(p["subject"], p["index"], p["answer"], p["prediction"]) for p in ours] == [
        (r["subject"], r["index"], r["answer"], r["prediction"]) for r in reference
    ]
    for mine, theirs in zip(ours, reference):
        assert mine["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-3)
    figures = json.loads(table.read_text(encoding="utf-8"))["benchmark"]
    dropped = {s: sum(r["shots"] < 5 for r in reference if r["subject"] == s) for s in subjects}
    assert dropped["anatomy"] == 0 and dropped["world_history"] > 0  # the test covers both paths
    assert {s: figures["subjects"][s]["shots_dropped"] for s in subjects} == dropped
    correct = {s: sum(r["prediction"] == r["answer"] for r in reference if r["subject"] == s) for s in subjects}
    assert {s: figures["subjects"][s]["correct"] for s in subjects} == correct
    assert figures["overall"]["micro"] == pytest.approx(sum(correct.values()) / (limit * len(subjects)))
    assert figures["overall"]["macro"] == pytest.approx(sum(c / limit for c in correct.values()) / len(subjects))
