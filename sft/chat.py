"""``zhllama chat``: talk to a model chain in its own prompt format, or complete plain text.

The prompt template is the one the model was tuned with: ``--template`` if given, else the
name recorded in the ``zhllama.json`` of the chain's last SFT adapter (or of a merged model,
which copies it), else the chat template in the chain's tokenizer (ours name their template;
a foreign one is used as it is through ``apply_chat_template``). Answers stream to stdout as
they are generated; everything else (banners, notes) goes to stderr, so
``zhllama chat --prompt ... > answer.txt`` captures only the answer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zhllama.args import ChainArgs
from zhllama.chain import ModelChain
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, option
from zhllama.provenance import read_manifest
from zhllama.sft.data import Conversation, Turn
from zhllama.sft.templates import TEMPLATES, get_template, render_prompt, template_of_chat_template


@dataclass(kw_only=True)
class ChatOptions(ChainArgs):
    template: str | None = option(
        None, help=f"prompt template, one of {', '.join(TEMPLATES)} (default: the one recorded with the model)"
    )
    system: str | None = option(None, help="system prompt (default: the template's own)")
    prompt: str | None = option(None, help="answer this one prompt and exit (for scripts)")
    raw: bool = option(False, help="plain text completion, no prompt template and no history")
    max_new_tokens: int = option(512, help="most tokens generated per answer")
    do_sample: bool = option(True, help="sample (--do-sample) or always take the likeliest token (--no-do-sample)")
    greedy: bool = option(False, help="greedy decoding; the same as --no-do-sample")
    temperature: float = option(0.7, help="sampling temperature")
    top_p: float = option(0.9, help="nucleus sampling: keep the likeliest tokens up to this probability mass")
    repetition_penalty: float = option(1.1, help="penalty for repeating tokens (1 = none)")
    seed: int | None = option(None, help="random seed, for reproducible sampling")

    def problems(self) -> list[str]:
        problems = []
        at_least(problems, "--max-new-tokens", self.max_new_tokens, 1)
        if self.temperature <= 0:
            problems.append(f"--temperature must be positive, got {self.temperature} (use --greedy for deterministic output)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"--repetition-penalty must be positive, got {self.repetition_penalty}")
        if self.raw and (self.template or self.system is not None):
            problems.append("--raw completes plain text; drop --template/--system")
        if self.template is not None and self.template not in TEMPLATES:
            problems.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        return problems

    @property
    def sampling(self) -> bool:
        return self.do_sample and not self.greedy


@dataclass
class PromptFormat:
    """How a conversation becomes model input: one of our templates, or the tokenizer's own."""

    name: str
    build: Callable[[Conversation, str], list[int]]


def recorded_template(chain: ModelChain) -> str | None:
    """The template recorded in the chain's manifests (last adapter first), if any."""
    for directory in [*reversed(chain.adapters), chain.model_dir]:
        manifest = read_manifest(directory)
        if manifest and manifest.template:
            return manifest.template
    return None


def prompt_format(chain: ModelChain, template_name: str | None, system: str | None) -> PromptFormat:
    """Resolve the prompt format; see the module docstring for the order."""
    tokenizer = chain.tokenizer
    name = template_name or recorded_template(chain) or template_of_chat_template(tokenizer.chat_template)
    if name is not None:
        template = get_template(name)

        def build(history: Conversation, user: str) -> list[int]:
            history = Conversation(history.turns, system if system is not None else history.system)
            text = render_prompt(template, history, user, bos=tokenizer.bos_token or "", eos=tokenizer.eos_token)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        return PromptFormat(name, build)
    if tokenizer.chat_template:

        def build_foreign(history: Conversation, user: str) -> list[int]:
            messages = [] if system is None else [{"role": "system", "content": system}]
            for turn in history.turns:
                messages += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.assistant}]
            messages.append({"role": "user", "content": user})
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]

        return PromptFormat("the tokenizer's chat template", build_foreign)
    raise ZhllamaError(
        f"{chain.model_dir}: no prompt template recorded with this model or its adapters; "
        f"pass --template ({', '.join(TEMPLATES)}) or --raw for plain completion"
    )


def generate(chain: ModelChain, input_ids: list[int], options: ChatOptions, stream) -> str:
    """Generate an answer to ``input_ids``, streaming it to ``stream``; returns the answer text."""
    import torch
    from transformers import TextStreamer

    tokenizer = chain.tokenizer
    limit = getattr(chain.model.config, "max_position_embeddings", None)
    if limit and len(input_ids) + options.max_new_tokens > limit:
        raise ZhllamaError(
            f"the prompt ({len(input_ids)} tokens) plus --max-new-tokens {options.max_new_tokens} exceeds the model's "
            f"{limit} positions; shorten the prompt, lower --max-new-tokens or /reset the conversation"
        )

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    sampling = {"do_sample": options.sampling}
    if options.sampling:
        sampling.update(temperature=options.temperature, top_p=options.top_p)
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        output = chain.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=options.max_new_tokens,
            repetition_penalty=options.repetition_penalty,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            **sampling,
        )
    return tokenizer.decode(output[0, len(input_ids) :], skip_special_tokens=True)


def chat(options: ChatOptions) -> str | None:
    """Chat with (or complete text from) a model chain in the terminal.

    Interactive: the conversation is kept between turns; ``/reset`` forgets it, ``/exit`` (or
    end of input) leaves. With ``prompt`` set, answers once and returns the answer.
    """
    chain = options.load()
    chain.model.eval()
    if options.seed is not None:
        import torch

        torch.manual_seed(options.seed)
    tokenizer = chain.tokenizer
    if options.raw:
        fmt = PromptFormat("raw", lambda history, text: tokenizer(text)["input_ids"])
    else:
        fmt = prompt_format(chain, options.template, options.system)
    out = sys.stdout
    if options.prompt is not None:
        return generate(chain, fmt.build(Conversation(()), options.prompt), options, out)

    print(f"zhllama chat: {chain.model_dir} ({fmt.name}); /reset forgets the conversation, /exit leaves", file=sys.stderr)
    history = Conversation(())
    answer = None
    while True:
        try:
            user = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            break
        command = user.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history = Conversation(())
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        try:
            answer = generate(chain, fmt.build(history, user), options, out)
        except ZhllamaError as e:  # e.g. the conversation outgrew the model: say so, keep chatting
            print(f"zhllama: {e}", file=sys.stderr)
            continue
        if not options.raw:
            history = Conversation((*history.turns, Turn(user, answer)))
    return answer
