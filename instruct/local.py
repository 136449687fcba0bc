"""Completions from a local model chain: batched ``generate`` in the chain's prompt format.

The prompt format is resolved as ``zhllama chat`` resolves it (:func:`zhllama.sft.chat.prompt_format`):
``--template``, else the template recorded with the chain, else its tokenizer's chat template;
``--raw`` sends the prompt as plain text (a base model continuing it, as Alpaca did with
text-davinci-003). Prompts of one batch are left-padded so every answer starts right after
its own prompt. A prompt that leaves the model fewer than :data:`MIN_NEW_TOKENS` positions is
an error (lower ``--seeds-per-prompt`` or ``--tasks-per-prompt``); otherwise the answer length
is capped at what the context has left.
"""

from __future__ import annotations

from dataclasses import dataclass

from zhllama.chain import ModelChain
from zhllama.errors import ZhllamaError

MIN_NEW_TOKENS = 32


@dataclass
class LocalGenerator:
    chain: ModelChain
    template: str | None = None
    raw: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2048
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        import torch

        from zhllama.sft.chat import PromptFormat, prompt_format

        tokenizer = self.chain.tokenizer
        if self.raw:
            self.format = PromptFormat("raw", lambda history, text: tokenizer(text)["input_ids"])
        else:
            self.format = prompt_format(self.chain, self.template, None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.context = getattr(self.chain.model.config, "max_position_embeddings", None)
        self.chain.model.eval()
        torch.manual_seed(self.seed)

    def label(self) -> str:
        return str(self.chain.model_dir)

    def describe(self) -> dict:
        return {**self.chain.describe(), "prompt_format": self.format.name, "batch_size": self.batch_size}

    def _ids(self, prompt: str) -> list[int]:
        from zhllama.sft.data import Conversation

        return self.format.build(Conversation(()), prompt)

    def complete_batch(self, prompts: list[str]) -> list[str]:
        """One reply per prompt, generated together."""
        import torch

        batch = [self._ids(p) for p in prompts]
        longest = max(len(ids) for ids in batch)
        new_tokens = self.max_tokens
        if self.context:
            room = self.context - longest
            new_tokens = min(new_tokens, room)
            if room < min(MIN_NEW_TOKENS, self.max_tokens):
                raise ZhllamaError(
                    f"the generation prompt is {longest} tokens and the model has {self.context} positions, leaving "
                    f"fewer than {MIN_NEW_TOKENS} for the answer; lower --seeds-per-prompt or --tasks-per-prompt, or use shorter seed tasks"
                )
        input_ids = torch.tensor([[self.pad_id] * (longest - len(ids)) + ids for ids in batch])
        attention_mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in batch])
        sampling = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            sampling.update(temperature=self.temperature, top_p=self.top_p)
        with torch.no_grad():
            output = self.chain.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=new_tokens,
                **sampling,
                eos_token_id=self.chain.tokenizer.eos_token_id,
                pad_token_id=self.pad_id,
            )
        return self.chain.tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)
