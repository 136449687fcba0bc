"""``zhllama sft`` and ``zhllama chat``: flags mapped to the stage functions."""

import functools

from zhllama.options import Command
from zhllama.sft.chat import ChatOptions, chat as chat_with_model
from zhllama.sft.train import SFTOptions, sft_chain
from zhllama.training import TRAINING_DEFAULTS


@functools.wraps(sft_chain)
def _sft_and_print(options, training_args):
    # until the shared CLI runner prints every result's summary (rank 0 only), this command does
    result = sft_chain(options, training_args)
    if training_args.process_index == 0:
        print(result.summary())
    return result


sft = Command(SFTOptions, _sft_and_print, training=True, training_defaults=TRAINING_DEFAULTS)
chat = Command(ChatOptions, chat_with_model)
