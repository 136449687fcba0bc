"""``zhllama extend``, ``zhllama pretrain`` and ``zhllama eval``: flags mapped to the stage functions."""

from zhllama.options import Command
from zhllama.pretrain.evaluate import EvalOptions, evaluate_chain
from zhllama.pretrain.extend import ExtendOptions, extend_model
from zhllama.pretrain.train import PretrainOptions, pretrain_chain
from zhllama.training import TRAINING_DEFAULTS


def extend_and_report(options: ExtendOptions):
    """extend_model, its summary printed (until the shared runner prints every result's summary)."""
    result = extend_model(options)
    print(result.summary())
    return result


extend = Command(ExtendOptions, extend_and_report)
pretrain = Command(PretrainOptions, pretrain_chain, training=True, training_defaults=TRAINING_DEFAULTS)
evaluate = Command(EvalOptions, evaluate_chain)
