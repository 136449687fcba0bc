"""Instruction data from seed tasks (self-instruct / Stanford Alpaca / BELLE), for ``zhllama sft``.

:func:`generate_instructions` is the API behind ``zhllama instruct``; see
:mod:`zhllama.instruct.generate` for the loop and the files it writes.
"""

from zhllama.instruct.generate import InstructOptions, InstructResult, generate_instructions
from zhllama.instruct.rouge import rouge_l, rouge_tokens
from zhllama.instruct.seeds import BUNDLED_SEEDS, Task, read_seed_tasks

__all__ = [
    "BUNDLED_SEEDS",
    "InstructOptions",
    "InstructResult",
    "Task",
    "generate_instructions",
    "read_seed_tasks",
    "rouge_l",
    "rouge_tokens",
]
