"""``zhllama demo`` and what it is made of: the built-in tiny default.

:mod:`zhllama.demo.tiny` builds a LLaMA-style base tokenizer, tiny random or briefly trained
LLaMAs and Chinese/English text in seconds (the demo's base, and the tests' fixtures);
:mod:`zhllama.demo.run` drives every pipeline step on them through the real commands.
"""
