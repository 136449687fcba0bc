"""Prompt templates: the Jinja chat template written into SFT outputs builds exactly the
training tokens, and the label masks are right token by token, for every template."""

from __future__ import annotations

import pytest

from zhllama.errors import ZhllamaError
from zhllama.sft.data import IGNORE_INDEX, Conversation, Turn, read_conversations, tokenize_conversation
from zhllama.sft.templates import TEMPLATES, chat_template, get_template, render, render_prompt, template_of_chat_template

CONVERSATIONS = {
    "single": Conversation((Turn("用一句话介绍长城。", "长城是中国古代的军事防御工程。"),)),
    "with-input": Conversation((Turn("把下面的句子翻译成英文。", "The weather is nice today.", input="今天天气很好。"),)),
    "multi-turn": Conversation(
        (
            Turn("一加一等于几？", "二。"),
            Turn("Add 7 more, please.", " It is 9 now."),
            Turn("再加一呢？", "十。\n还有别的问题吗？"),
        ),
        system="你是一个数学老师。",
    ),
    "empty-system": Conversation((Turn("hello", "你好"), Turn("bye", "再见")), system=""),
}


def messages_of(conversation: Conversation) -> list[dict]:
    messages = [] if conversation.system is None else [{"role": "system", "content": conversation.system}]
    for turn in conversation.turns:
        user = {"role": "user", "content": turn.user}
        if turn.input:
            user["input"] = turn.input
        messages += [user, {"role": "assistant", "content": turn.assistant}]
    return messages


@pytest.fixture(scope="module")
def tokenizer(base_tokenizer_dir):
    from zhllama.chain import load_tokenizer

    return load_tokenizer(base_tokenizer_dir)


def with_template(tokenizer, name):
    tokenizer.chat_template = chat_template(get_template(name))
    return tokenizer


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_template_builds_the_training_tokens(tokenizer, name, conversation):
    conversation = CONVERSATIONS[conversation]
    template = get_template(name)
    tokenizer = with_template(tokenizer, name)
    text = "".join(s.text for s in render(template, conversation, bos=tokenizer.bos_token, eos=tokenizer.eos_token))
    assert tokenizer.apply_chat_template(messages_of(conversation), tokenize=False) == text
    ids, _, _ = tokenize_conversation(conversation, template, tokenizer)
    assert tokenizer.apply_chat_template(messages_of(conversation), tokenize=True)["input_ids"] == ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("name", TEMPLATES)
def test_labels_token_by_token(tokenizer, name, conversation):
    """Checked against prefixes tokenised on their own (not the offsets the code uses): each
    turn's prompt is -100, its response and EOS are labels, and the generation prompt that
    chat sends is a token prefix of the trained sequence."""
    conversation = CONVERSATIONS[conversation]
    template = get_template(name)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    ids, labels, turn_ends = tokenize_conversation(conversation, template, tokenizer)
    assert len(ids) == len(labels)
    assert len(turn_ends) == len(conversation.turns)
    done = 0
    for k, turn in enumerate(conversation.turns):
        segments = render(template, Conversation(conversation.turns[: k + 1], conversation.system), bos=bos, eos=eos)
        prompt = "".join(s.text for s in segments[:-1])
        upto = prompt + segments[-1].text
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        upto_ids = tokenizer(upto, add_special_tokens=False)["input_ids"]
        assert ids[: len(prompt_ids)] == prompt_ids, "the generation prompt is not a token prefix of the trained text"
        assert ids[: len(upto_ids)] == upto_ids
        assert labels[done : len(prompt_ids)] == [IGNORE_INDEX] * (len(prompt_ids) - done)
        assert labels[len(prompt_ids) : len(upto_ids)] == ids[len(prompt_ids) : len(upto_ids)]
        assert labels[len(upto_ids) - 1] == tokenizer.eos_token_id
        response = tokenizer.decode(ids[len(prompt_ids) : len(upto_ids) - 1])
        assert response.strip() == turn.assistant.strip()
        assert turn_ends[k] == len(upto_ids)
        done = len(upto_ids)
    assert done == len(ids)


def test_render_prompt_equals_chat_template_generation_prompt(tokenizer):
    conversation = CONVERSATIONS["multi-turn"]
    for name, template in TEMPLATES.items():
        tokenizer = with_template(tokenizer, name)
        messages = messages_of(conversation)[:-1]
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        history = Conversation(conversation.turns[:-1], conversation.system)
        assert render_prompt(template, history, conversation.turns[-1].user, bos=tokenizer.bos_token, eos=tokenizer.eos_token) == expected


def test_known_formats():
    assert render_single("alpaca", Turn("Say hi.", "hi")) == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi.\n\n### Response:\nhi</s>"
    )
    assert render_single("alpaca", Turn("Translate.", "hi", input="你好")).startswith(
        "<s>Below is an instruction that describes a task, paired with an input that provides further context."
    )
    assert render_single("alpaca", Turn("Translate.", "hi", input="你好")).endswith(
        "### Instruction:\nTranslate.\n\n### Input:\n你好\n\n### Response:\nhi</s>"
    )
    assert render_single("chinese-alpaca", Turn("翻译", "hi", input="你好")).endswith(
        "### Instruction:\n翻译\n你好\n\n### Response: hi</s>"
    )
    assert render_single("llama2-chat", Turn("你好", "您好")) == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n<</SYS>>\n\n你好 [/INST] 您好</s>"
    )
    assert render_single("ziya", Turn("你好", "您好")) == "<s><human>:你好\n<bot>:您好</s>"


def render_single(name: str, turn: Turn) -> str:
    return "".join(s.text for s in render(get_template(name), Conversation((turn,)), bos="<s>", eos="</s>"))


def test_unknown_template_lists_the_known_ones():
    with pytest.raises(ZhllamaError, match="unknown template 'vicuna'.*alpaca, chinese-alpaca, llama2-chat, ziya"):
        get_template("vicuna")


def test_chat_template_refuses_messages_that_do_not_alternate(tokenizer):
    tokenizer = with_template(tokenizer, "llama2-chat")
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)


def test_template_name_is_recoverable_from_the_chat_template():
    for name, template in TEMPLATES.items():
        assert template_of_chat_template(chat_template(template)) == name
    assert template_of_chat_template("{{ messages }}") is None


@pytest.mark.real_assets
def test_chinese_llama_tokenizer_agrees_on_ruozhiba(assets, tmp_path):
    """The real merged vocabulary (Chinese-LLaMA, 49,953 pieces) on real instruction data: the
    chat template gives the training tokens and the generation prompt is a token prefix."""
    import shutil

    from zhllama.chain import load_tokenizer
    from zhllama.vocab.hf import save_hf_tokenizer

    shutil.copy(assets / "tokenizers/chinese-llama/chinese_llama_49953.model", tmp_path / "tokenizer.model")
    save_hf_tokenizer(tmp_path / "tokenizer.model", tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    conversations = read_conversations([assets / "sft/ruozhiba_qa2449_zh.json"])[:40]
    for name, template in TEMPLATES.items():
        tokenizer.chat_template = chat_template(template)
        for conversation in conversations:
            ids, labels, _ = tokenize_conversation(conversation, template, tokenizer)
            assert tokenizer.apply_chat_template(messages_of(conversation), tokenize=True)["input_ids"] == ids
            prompt = tokenizer.apply_chat_template(messages_of(conversation)[:-1], tokenize=True, add_generation_prompt=True)["input_ids"]
            assert ids[: len(prompt)] == prompt
            assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
            assert labels[len(prompt) :] == ids[len(prompt) :]
