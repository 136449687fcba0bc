"""``zhllama instruct``: flags mapped to the stage function."""

from zhllama.instruct.generate import InstructOptions, generate_instructions
from zhllama.options import Command

instruct = Command(InstructOptions, generate_instructions)
