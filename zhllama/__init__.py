"""zhllama: teach LLaMA-family models Chinese.

Stages live in their own packages (``zhllama.vocab``, ``zhllama.pretrain``, ``zhllama.sft``,
``zhllama.merge``); this package holds what they share: corpus reading, the model + adapter
chain loader, self-describing output directories, option parsing and errors.
"""

__version__ = "0.1.0"

from zhllama.errors import ZhllamaError

__all__ = ["ZhllamaError", "__version__"]
