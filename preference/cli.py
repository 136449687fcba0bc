"""``zhllama dpo``, ``zhllama rm`` and ``zhllama rm score``: each command's options mapped to its function."""

from zhllama.options import Command
from zhllama.preference.dpo import DPOOptions, dpo as run_dpo
from zhllama.preference.rm import RMOptions, RMScoreOptions, rm as run_rm, rm_score as run_rm_score

dpo = Command(DPOOptions, run_dpo, training=True)
rm = Command(RMOptions, run_rm, training=True)
rm_score = Command(RMScoreOptions, run_rm_score)
