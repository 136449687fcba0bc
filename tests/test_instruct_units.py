"""zhllama instruct, piece by piece: ROUGE-L on hand-worked Chinese and English cases, the
reply parser, the filters and the seed-task reader."""

from __future__ import annotations

import json
import random

import pytest

from zhllama.errors import ZhllamaError
from zhllama.instruct import filters
from zhllama.instruct.prompts import build_prompt, parse_reply
from zhllama.instruct.rouge import SimilarityIndex, lcs_length, rouge_l, rouge_tokens
from zhllama.instruct.seeds import BUNDLED_SEEDS, Task, read_seed_tasks


def dynamic_programming_lcs(a: list[str], b: list[str]) -> int:
    """The textbook O(len(a) * len(b)) table, as the reference for the bit-parallel LCS."""
    previous = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(previous[j] + 1 if x == y else max(previous[j + 1], row[j]))
        previous = row
    return previous[-1]


# ---------------------------------------------------------------------------- ROUGE-L


def test_tokens_are_cjk_characters_and_lower_cased_words_without_punctuation():
    assert rouge_tokens("用Python写一个排序函数！") == ["用", "python", "写", "一", "个", "排", "序", "函", "数"]
    assert rouge_tokens("The cat, the MAT.") == ["the", "cat", "the", "mat"]
    assert rouge_tokens("，。！？……") == []


@pytest.mark.parametrize(
    "a, b, lcs, expected",
    [
        # English words: the cat _ on the mat -> LCS 5 of 6 and 6 words: 2*5/12
        ("The cat sat on the mat.", "the cat was on the mat", 5, 10 / 12),
        # one character changed in nine: 2*8/18
        ("写一首关于春天的诗", "写一首关于秋天的诗", 8, 16 / 18),
        # the second is a tail of the first: LCS 5 of 10 and 5: 2*5/15, below the default threshold 0.7
        ("请把这句话翻译成英文", "翻译成英文", 5, 10 / 15),
        # mixed: 用 python 写 排 序 shared, 9 and 5 tokens: 2*5/14
        ("用Python写一个排序函数", "用 python 写排序", 5, 10 / 14),
        # the same characters in reverse order share only one in sequence: 2*1/8
        ("天下大事", "事大下天", 1, 2 / 8),
        # punctuation is not a token
        ("你好！", "你好", 2, 1.0),
        ("", "任何文字", 0, 0.0),
    ],
)
def test_rouge_l_on_hand_worked_cases(a, b, lcs, expected):
    assert lcs_length(rouge_tokens(a), rouge_tokens(b)) == lcs
    assert rouge_l(a, b) == pytest.approx(expected)
    assert rouge_l(b, a) == pytest.approx(expected)  # F with beta 1 is symmetric


def test_rouge_l_on_jieba_words_differs_from_characters_as_worked_by_hand():
    assert rouge_tokens("我喜欢北京", "jieba") == ["我", "喜欢", "北京"]
    assert rouge_tokens("我喜欢上海", "jieba") == ["我", "喜欢", "上海"]
    assert rouge_l("我喜欢北京", "我喜欢上海", "jieba") == pytest.approx(4 / 6)  # 2 of 3 words
    assert rouge_l("我喜欢北京", "我喜欢上海", "char") == pytest.approx(6 / 10)  # 3 of 5 characters


def test_bit_parallel_lcs_equals_the_dynamic_programming_table():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("甲乙丙丁") for _ in range(rng.randint(0, 70))]  # over 64 tokens: several machine words
        b = [rng.choice("甲乙丙丁戊") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == dynamic_programming_lcs(a, b)


def test_similarity_index_finds_the_near_duplicate_and_skips_what_lengths_rule_out():
    index = SimilarityIndex()
    index.add(rouge_tokens("写一首关于春天的诗"))
    index.add(rouge_tokens("解释一下光合作用的过程"))
    assert index.reaches(rouge_tokens("写一首关于秋天的诗"), 0.7) == pytest.approx(16 / 18)
    assert index.reaches(rouge_tokens("写一首关于秋天的诗"), 0.9) is None
    # a 2-token text against 9 and 11 tokens can score at most 2*2/11 < 0.7: never compared, never similar
    assert index.reaches(rouge_tokens("写诗"), 0.7) is None


def test_similarity_index_bound_never_hides_a_pair_that_reaches_the_threshold():
    rng = random.Random(1)
    texts = ["".join(rng.choice("春夏秋冬天地人和山水") for _ in range(rng.randint(1, 12))) for _ in range(300)]
    index = SimilarityIndex()
    for text in texts[:200]:
        index.add(rouge_tokens(text))
    for text in texts[200:]:
        best = max(rouge_l(text, kept) for kept in texts[:200])
        for threshold in (0.5, 0.7, 0.9):
            found = index.reaches(rouge_tokens(text), threshold)
            assert (found is not None) == (best >= threshold)
            assert found is None or found >= threshold


# ---------------------------------------------------------------------------- parsing

TASKS = [{"instruction": "列举三种水果", "input": "", "output": "苹果、香蕉、橙子"}, {"instruction": "翻译", "input": "你好", "output": "Hello"}]


def test_parser_reads_a_bare_and_a_fenced_json_array():
    bare = parse_reply(json.dumps(TASKS, ensure_ascii=False))
    fenced = parse_reply("好的：\n```json\n" + json.dumps(TASKS, ensure_ascii=False, indent=2) + "\n```\n希望有帮助。")
    expected = [Task("列举三种水果", "", "苹果、香蕉、橙子"), Task("翻译", "你好", "Hello")]
    assert bare.tasks == expected and bare.malformed == 0 and not bare.unparseable
    assert fenced.tasks == expected and fenced.malformed == 0


def test_parser_keeps_the_complete_objects_of_an_array_cut_off_by_the_token_limit():
    text = json.dumps(TASKS, ensure_ascii=False)
    cut = parse_reply("说明见[1]。\n" + text[: text.index("翻译") + 4])  # brackets in prose are not the array
    assert cut.tasks == [Task("列举三种水果", "", "苹果、香蕉、橙子")]
    assert cut.malformed == 1


def test_parser_counts_elements_that_are_not_tasks_as_malformed():
    reply = json.dumps([TASKS[0], {"instruction": "没有回答"}, {"instruction": 3, "output": "x"}, {"instruction": "a b c", "output": "ok", "input": None}])
    parsed = parse_reply(reply)
    assert parsed.tasks == [Task("列举三种水果", "", "苹果、香蕉、橙子"), Task("a b c", "", "ok")]
    assert parsed.malformed == 2


def test_parser_reads_alpaca_numbered_text_in_english_and_chinese_labels():
    english = "1. Instruction: Name a color.\n1. Input:\n<noinput>\n1. Output:\nBlue.\n###\n2. Instruction: Add them.\n2. Input:\n2 and 3\n2. Output:\n5\n###\n3. Instruction: cut off"
    chinese = "1. 指令：把句子翻译成英文。\n1. 输入：<无输入>\n1. 输出：好的\n2、指令：计算\n2、输入：1+1\n2、输出：2"
    parsed = parse_reply(english)
    assert parsed.tasks == [Task("Name a color.", "", "Blue."), Task("Add them.", "2 and 3", "5")]
    assert parsed.malformed == 1  # the third has no output
    assert parse_reply(chinese).tasks == [Task("把句子翻译成英文。", "", "好的"), Task("计算", "1+1", "2")]


@pytest.mark.parametrize("reply", ["抱歉，我无法完成这个请求。", "", "[1, 2, 3]", '{"instruction": "单个对象", "output": "不是数组"}'])
def test_parser_marks_anything_else_unparseable(reply):
    parsed = parse_reply(reply)
    assert parsed.unparseable and parsed.tasks == []


def test_prompt_shows_the_examples_as_json_and_asks_for_the_count_in_the_language():
    examples = [Task("把下面的文言文翻译成现代汉语。", "学而时习之", "学习并时常温习")]
    zh, en = build_prompt(examples, 7, "zh"), build_prompt(examples, 7, "en")
    shown = json.dumps([examples[0].as_record()], ensure_ascii=False, indent=1)
    assert shown in zh and shown in en
    assert "7 个对象" in zh and "7 objects" in en
    assert parse_reply(shown).tasks == examples  # the format asked for is the format read


# ---------------------------------------------------------------------------- filters


def test_filter_drops_each_kind_for_its_reason_and_catches_near_duplicates_of_what_it_kept():
    pool = filters.TaskFilter(threshold=0.7, min_length=3, max_length=20)
    pool.add(Task("写一首关于春天的诗", "", "春眠不觉晓"))  # a seed
    cases = [
        (Task("写诗", "", "x"), filters.TOO_SHORT),
        (Task("请" * 21, "", "x"), filters.TOO_LONG),
        (Task("根据这张图片写一段描述", "", "x"), filters.NOT_TEXT),
        (Task("Describe the attached image briefly", "", "x"), filters.NOT_TEXT),
        (Task("列举三种常见的水果", "", "  "), filters.EMPTY_OUTPUT),
        (Task("写一首关于春天的诗", "", "另一首"), filters.EXACT_DUPLICATE),
        (Task("写一首关于秋天的诗", "", "x"), filters.SIMILAR),
        (Task("解释成语画蛇添足的意思", "", "多此一举"), None),  # 画蛇添足 is not a drawing request
        (Task("解释成语画蛇添足的含义", "", "x"), filters.SIMILAR),  # close to the one just kept
        (Task("去图书馆借书要带什么证件", "", "借书证"), None),
    ]
    for task, reason in cases:
        assert pool.reason_to_drop(task) == reason, task


def test_exact_duplicate_is_instruction_and_input_together():
    pool = filters.TaskFilter(threshold=1.0)
    pool.add(Task("把下面的句子翻译成英文", "你好", "Hello"))
    assert pool.reason_to_drop(Task("把下面的句子翻译成英文", "你好", "Hi")) == filters.EXACT_DUPLICATE
    # same instruction, other input: not exact, but ROUGE-L 1.0 on the instruction
    assert pool.reason_to_drop(Task("把下面的句子翻译成英文", "再见", "Goodbye")) == filters.SIMILAR


# ---------------------------------------------------------------------------- seeds


def test_bundled_seed_set_covers_the_kinds_and_every_task_is_complete():
    tasks = read_seed_tasks(None)
    records = [json.loads(line) for line in BUNDLED_SEEDS.read_text(encoding="utf-8").splitlines()]
    assert len(tasks) == len(records) >= 30
    assert all(t.instruction and t.output for t in tasks)
    assert sum(r["is_classification"] for r in records) >= 5
    assert len({t.instruction for t in tasks}) == len(tasks)
    # the seeds are not near-duplicates of each other (else every generated one near them would be dropped twice over)
    pool = filters.TaskFilter()
    assert [pool.reason_to_drop(t) for t in tasks] == [None] * len(tasks)


def test_seed_reader_takes_self_instruct_and_alpaca_records(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        json.dumps({"id": "s0", "instruction": "解释词语", "instances": [{"input": "守株待兔", "output": "比喻死守经验"}, {"input": "b", "output": "c"}], "is_classification": False}, ensure_ascii=False)
        + "\n"
        + json.dumps({"instruction": "写一句问候", "output": "你好"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    assert read_seed_tasks(path) == [Task("解释词语", "守株待兔", "比喻死守经验"), Task("写一句问候", "", "你好")]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": \n', "seeds.jsonl:2: malformed JSON"),
        ('{"instruction": "a"}\n', "seeds.jsonl:1: seed task field 'output' is missing"),
        ('{"instruction": "a", "instances": []}\n', "seeds.jsonl:1: seed task 'instances' must be a non-empty list"),
        ('["not an object"]', "seeds.jsonl record 1: a seed task must be a JSON object"),
        ("", "seeds.jsonl: no seed tasks"),
    ],
)
def test_seed_reader_names_the_file_and_line_of_a_bad_seed(tmp_path, content, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ZhllamaError, match=message.replace("[", r"\[")):
        read_seed_tasks(path)
