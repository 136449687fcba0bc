"""C-Eval and MMLU in their exact layouts (fixtures written here), CMMLU's shot dropping,
lm-evaluation-harness's continuation encoding, --with-template, subjects.json, and bad
benchmark input refused with one line that names the file (and line), nothing written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pretrain_fixtures import run
from zhllama.chain import load_tokenizer
from zhllama.evaluate.benchmarks import load_benchmark
from zhllama.evaluate.prompts import STYLES, build_prompt, format_shot
from zhllama.evaluate.scoring import encode_pair
from zhllama.sft.templates import get_template

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def questions(count: int, prefix: str) -> list[list[str]]:
    return [[f"{prefix}{i}的答案是哪个？", f"甲{i}", f"乙{i}", f"丙{i}", f"丁{i}", "ABCD"[i % 4]] for i in range(count)]


def write_ceval(root: Path) -> Path:
    """C-Eval's layout: dev (with explanations), val (scored) and test (no answers)."""
    for subject in ("computer_network", "logic"):
        dev = [[str(i), *q, "因为如此。"] for i, q in enumerate(questions(3, subject + "示例"))]
        write_csv(root / "dev" / f"{subject}_dev.csv", [["id", "question", "A", "B", "C", "D", "answer", "explanation"], *dev])
        val = [[str(i), *q] for i, q in enumerate(questions(5, subject))]
        write_csv(root / "val" / f"{subject}_val.csv", [["id", "question", "A", "B", "C", "D", "answer"], *val])
        test = [[str(i), *q[:5]] for i, q in enumerate(questions(4, subject))]
        write_csv(root / "test" / f"{subject}_test.csv", [["id", "question", "A", "B", "C", "D"], *test])
    return root


def write_mmlu(root: Path) -> Path:
    """MMLU's layout: headerless question,A,B,C,D,answer files."""
    dev = [["What is 1+1?", "1", "2", "3", "4", "B"], ["What is 2+2?", "2", "3", "4", "5", "C"]]
    write_csv(root / "dev" / "abstract_algebra_dev.csv", dev)
    write_csv(root / "test" / "abstract_algebra_test.csv", [["What is 3+3?", "5", "6", "7", "8", "B"], ["Is 7 prime?", "yes", "no", "maybe", "never", "A"]])
    return root


def write_cmmlu(root: Path, subject: str = "anatomy", dev_rows: int = 5) -> Path:
    header = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(root / "dev" / f"{subject}.csv", [header, *[[str(i), *q] for i, q in enumerate(questions(dev_rows, "示例"))]])
    write_csv(root / "test" / f"{subject}.csv", [header, *[[str(i), *q] for i, q in enumerate(questions(4, "问题"))]])
    return root


def test_ceval_prompt_and_scoring_on_its_layout(tmp_path, tiny_model_dir):
    root = write_ceval(tmp_path / "ceval")
    network = load_benchmark("ceval", root, subjects=["computer_network"], shots=1, limit=None)[0]
    assert (network.name, network.categories, len(network.scored)) == ("计算机网络", ("STEM",), 5)
    style = STYLES["ceval"]
    prompt = build_prompt(style, network.name, network.scored[1], [format_shot(style, network.dev[0])], [1], fits=lambda *_: True)
    assert prompt.context == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "computer_network示例0的答案是哪个？\nA. 甲0\nB. 乙0\nC. 丙0\nD. 丁0\n答案：A\n\n"
        "computer_network1的答案是哪个？\nA. 甲1\nB. 乙1\nC. 丙1\nD. 丁1\n答案："
    )
    assert prompt.continuations["C"] == "C"
    out, predictions = tmp_path / "ceval.json", tmp_path / "ceval.jsonl"
    run(["eval", "--model", tiny_model_dir, "--benchmark", "ceval", "--benchmark-dir", root, "--shots", 3,
         "--json", out, "--predictions", predictions])  # fmt: skip
    figures = json.loads(out.read_text(encoding="utf-8"))["benchmark"]
    # val is scored (test has no answers); categories from the built-in C-Eval table
    assert figures["overall"]["questions"] == 10 and set(figures["categories"]) == {"STEM", "Humanities"}
    lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [(p["subject"], p["index"]) for p in lines] == [(s, i) for s in ("computer_network", "logic") for i in range(5)]
    assert all(set(p["logprobs"]) == set("ABCD") and p["prediction"] == max(p["logprobs"], key=p["logprobs"].get) for p in lines)


def test_mmlu_prompt_is_the_published_one(tmp_path, tiny_model_dir, capsys):
    root = write_mmlu(tmp_path / "mmlu")
    algebra = load_benchmark("mmlu", root, subjects=[], shots=2, limit=1)[0]
    style = STYLES["mmlu"]
    shots = [format_shot(style, q) for q in algebra.dev]
    prompt = build_prompt(style, algebra.name, algebra.scored[0], shots, [1, 1], fits=lambda *_: True)
    # hendrycks/test's evaluate.py: two spaces before the subject, " B" after "Answer:"
    assert prompt.context == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 2+2?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: C\n\n"
        "What is 3+3?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    )
    assert prompt.continuations["B"] == " B"
    run(["eval", "--model", tiny_model_dir, "--benchmark", "mmlu", "--benchmark-dir", root, "--shots", 2])
    assert "abstract_algebra" in capsys.readouterr().out


def test_continuations_are_encoded_as_lm_evaluation_harness_does(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    context, continuation = encode_pair(tokenizer, "Answer:", " B")
    assert context == [tokenizer.bos_token_id, *encode("Answer:")]
    assert context[1:] + continuation == encode("Answer: B")
    # whitespace that ends the context moves to the continuation
    assert encode_pair(tokenizer, "Answer: ", "B") == (context, continuation)


def test_longest_shots_are_dropped_first_ties_together():
    style = STYLES["cmmlu"]
    shots = ["<short>", "<long one>", "<long two>", "<mid>"]
    seen = []

    def fits(context, continuations):
        seen.append([s for s in shots if s in context])
        return len(seen) == 3  # fit after two rounds of dropping

    from zhllama.evaluate.benchmarks import Question

    question = Question("题", ("a", "b", "c", "d"), "A", "x:1")
    prompt = build_prompt(style, "学科", question, shots, [5, 9, 9, 7], fits=fits)
    assert seen == [shots, ["<short>", "<mid>"], ["<short>"]]
    assert prompt.shots == 1 and "<short>" in prompt.context


def test_with_template_wraps_the_question(tmp_path, tiny_model_dir):
    root = write_cmmlu(tmp_path / "cmmlu")
    anatomy = load_benchmark("cmmlu", root, subjects=[], shots=0, limit=1)[0]
    template = get_template("llama2-chat")
    prompt = build_prompt(STYLES["cmmlu"], anatomy.name, anatomy.scored[0], [], [], fits=lambda *_: True, template=template)
    assert prompt.context.startswith("[INST] <<SYS>>\n") and prompt.context.endswith("答案是： [/INST]")
    assert "以下是关于解剖学的单项选择题" in prompt.context and prompt.continuations["D"] == " D"
    out = tmp_path / "t.json"
    run(["eval", "--model", tiny_model_dir, "--benchmark", "cmmlu", "--benchmark-dir", root, "--with-template", "llama2-chat", "--shots", 3, "--json", out])
    assert json.loads(out.read_text(encoding="utf-8"))["benchmark"]["template"] == "llama2-chat"


def test_subjects_json_names_and_categorises(tmp_path):
    root = write_cmmlu(tmp_path / "custom", subject="my_subject")
    (root / "subjects.json").write_text(json.dumps({"my_subject": {"name_zh": "我的学科", "categories": ["Mine"]}}), encoding="utf-8")
    subject = load_benchmark("cmmlu", root, subjects=[], shots=2, limit=None)[0]
    assert (subject.name, subject.categories, len(subject.dev), len(subject.scored)) == ("我的学科", ("Mine",), 2, 4)


def bad_benchmarks(tmp_path: Path) -> list[tuple[list, str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_dev = write_cmmlu(tmp_path / "no_dev")
    (no_dev / "dev" / "anatomy.csv").unlink()
    no_column = write_cmmlu(tmp_path / "no_column")
    write_csv(no_column / "test" / "anatomy.csv", [["", "Question", "A", "B", "C", "D"], ["0", "q", "a", "b", "c", "d"]])
    bad_answer = write_cmmlu(tmp_path / "bad_answer")
    # a quoted cell spanning two lines: the bad row starts on line 4 of the file
    write_csv(bad_answer / "test" / "anatomy.csv", [["", "Question", "A", "B", "C", "D", "Answer"],
              ["0", "第一行\n第二行", "a", "b", "c", "d", "A"], ["1", "q", "a", "b", "c", "d", "E"]])  # fmt: skip
    unknown = write_cmmlu(tmp_path / "unknown", subject="not_a_cmmlu_subject")
    cmmlu = ["--benchmark", "cmmlu", "--benchmark-dir"]
    return [
        ([*cmmlu, empty], "not a cmmlu benchmark directory; expected dev/SUBJECT.csv and test/SUBJECT.csv"),
        ([*cmmlu, tmp_path / "nowhere"], "no such directory"),
        ([*cmmlu, no_dev], f"{no_dev / 'dev' / 'anatomy.csv'}: missing"),
        ([*cmmlu, no_column], f"{no_column / 'test' / 'anatomy.csv'}:1: missing column(s) Answer"),
        ([*cmmlu, bad_answer], f"{bad_answer / 'test' / 'anatomy.csv'}:4: answer 'E' is not one of A, B, C, D"),
        ([*cmmlu, write_cmmlu(tmp_path / "few", dev_rows=2)], "--shots 5, but"),
        ([*cmmlu, unknown], "'not_a_cmmlu_subject'"),
        ([*cmmlu, no_column, "--subjects", "anatomy,nope"], "--subjects: nope not in"),
        (["--benchmark", "ceval"], "--benchmark ceval needs --benchmark-dir"),
        ([*cmmlu, empty, "--shots", "-1"], "--shots must be at least 0"),
        ([*cmmlu, empty, "--with-template", "nope"], "unknown template 'nope'"),
    ]


def test_bad_benchmark_input(tmp_path, tiny_model_dir, capsys):
    out, predictions = tmp_path / "out.json", tmp_path / "out.jsonl"
    for argv, message in bad_benchmarks(tmp_path):
        run(["eval", "--model", tiny_model_dir, *argv, "--json", out, "--predictions", predictions], expect=1)
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("zhllama: error: ") and message in last, (message, last)
        assert not out.exists() and not predictions.exists()
