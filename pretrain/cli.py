"""``zhllama extend``, ``zhllama pretrain`` and ``zhllama eval``: flags mapped to the stage functions."""

import functools

from zhllama.options import Command
from zhllama.pretrain.evaluate import EvalOptions, evaluate_chain
from zhllama.pretrain.extend import ExtendOptions, extend_model
from zhllama.pretrain.train import PretrainOptions, pretrain_chain
from zhllama.training import TRAINING_DEFAULTS


@functools.wraps(pretrain_chain)
def _pretrain_and_print(options, training_args):
    # until the shared CLI runner prints every result's summary (rank 0 only), this command does
    result = pretrain_chain(options, training_args)
    if training_args.process_index == 0:
        print(result.summary())
    return result


extend = Command(ExtendOptions, extend_model)
pretrain = Command(PretrainOptions, _pretrain_and_print, training=True, training_defaults=TRAINING_DEFAULTS)
evaluate = Command(EvalOptions, evaluate_chain)
