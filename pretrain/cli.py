"""``zhllama extend`` and ``zhllama pretrain``: each command's options mapped to its function."""

from zhllama.options import Command
from zhllama.pretrain.extend import ExtendOptions, extend_model
from zhllama.pretrain.train import PretrainOptions, pretrain_chain

extend = Command(ExtendOptions, extend_model)
pretrain = Command(PretrainOptions, pretrain_chain, training=True)
