"""``zhllama sft`` and ``zhllama chat``: each command's options mapped to its function."""

from zhllama.options import Command
from zhllama.sft.chat import ChatOptions, chat as chat_with_model
from zhllama.sft.train import SFTOptions, sft_chain

sft = Command(SFTOptions, sft_chain, training=True)
chat = Command(ChatOptions, chat_with_model)
