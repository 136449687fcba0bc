"""``zhllama extend`` and ``zhllama pretrain``: flags mapped to the stage functions."""

from zhllama.options import Command
from zhllama.pretrain.extend import ExtendOptions, extend_model
from zhllama.pretrain.train import PretrainOptions, pretrain_chain

extend = Command(ExtendOptions, extend_model)
pretrain = Command(PretrainOptions, pretrain_chain, training=True)
