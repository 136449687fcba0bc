"""``zhllama eval`` and ``zhllama report``: each command's options mapped to its function."""

from zhllama.evaluate.report import ReportOptions, report_run
from zhllama.evaluate.run import EvalOptions, evaluate_chain
from zhllama.options import Command

evaluate = Command(EvalOptions, evaluate_chain)
report = Command(ReportOptions, report_run)
