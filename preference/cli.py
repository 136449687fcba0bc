"""``zhllama dpo``, ``zhllama rm`` and ``zhllama rm score``: flags mapped to the stage functions."""

from zhllama.options import Command
from zhllama.preference.dpo import DPO_TRAINING_DEFAULTS, DPOOptions, dpo as run_dpo
from zhllama.training import TRAINING_DEFAULTS

dpo = Command(DPOOptions, run_dpo, training=True, training_defaults={**TRAINING_DEFAULTS, **DPO_TRAINING_DEFAULTS})
