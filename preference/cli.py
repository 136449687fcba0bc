"""``zhllama dpo``, ``zhllama rm`` and ``zhllama rm score``: flags mapped to the stage functions."""

from zhllama.options import Command
from zhllama.preference.dpo import DPO_TRAINING_DEFAULTS, DPOOptions, dpo as run_dpo
from zhllama.preference.rm import RM_TRAINING_DEFAULTS, RMOptions, RMScoreOptions, rm as run_rm, rm_score as run_rm_score
from zhllama.training import TRAINING_DEFAULTS

dpo = Command(DPOOptions, run_dpo, training=True, training_defaults={**TRAINING_DEFAULTS, **DPO_TRAINING_DEFAULTS})
rm = Command(RMOptions, run_rm, training=True, training_defaults={**TRAINING_DEFAULTS, **RM_TRAINING_DEFAULTS})
rm_score = Command(RMScoreOptions, run_rm_score)
