"""``zhllama eval`` and ``zhllama report``: flags mapped to the functions."""

from __future__ import annotations

import functools

from zhllama.evaluate.report import ReportOptions, report_run
from zhllama.evaluate.run import EvalOptions, evaluate_chain
from zhllama.options import Command


def printing_summary(function):
    """``function`` printing its result's ``summary()``: what ``zhllama.cli.run_command`` does
    for every command once the stage contract is consolidated there; remove this then."""

    @functools.wraps(function)
    def run(options):
        result = function(options)
        print(result.summary(), flush=True)
        return result

    return run


evaluate = Command(EvalOptions, printing_summary(evaluate_chain))
report = Command(ReportOptions, printing_summary(report_run))
