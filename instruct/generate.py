"""``zhllama instruct``: new instruction data from seed tasks, self-instruct / Alpaca style.

The loop reads top to bottom: check options → read the seed tasks → reload what an earlier run
kept (the work file) → make the generator (an OpenAI-compatible endpoint, or a local model
chain) → until ``--num-instructions`` are kept: sample ``--seeds-per-prompt`` seeds and up to
``--generated-per-prompt`` kept tasks, ask for ``--tasks-per-prompt`` new ones, parse the reply,
filter every task (:mod:`zhllama.instruct.filters`), append what is kept to the work file →
write ``--out`` (Alpaca JSON, atomically) and its manifest.

Files, for ``--out DIR/NAME.json``: ``DIR/NAME.work.jsonl`` holds one kept record per line and,
after the records of each reply, one ``{"reply_counts": ...}`` line (tasks parsed, drops by
reason), flushed as it goes: a run that is killed loses at most the reply it was reading, and
a rerun with the same ``--out`` continues from it (the kept tasks rejoin the similarity pool;
a line cut off by the kill is dropped). The work file stays after success, so a rerun with a
larger ``--num-instructions`` extends the data. ``DIR/NAME.zhllama.json`` is the manifest
(seeds, endpoint or chain, sampling settings, counts, time); the API key is never in it.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from zhllama.args import ChainArgs
from zhllama.errors import ZhllamaError
from zhllama.options import at_least, option
from zhllama.outdir import atomic_output_file
from zhllama.provenance import MANIFEST, write_manifest

from .filters import MALFORMED, UNPARSEABLE, TaskFilter, counts_line
from .prompts import LANGUAGES, build_prompt, parse_reply
from .rouge import ROUGE_UNITS
from .seeds import BUNDLED_SEEDS, Task, read_seed_tasks

REPLY_COUNTS = "reply_counts"


@dataclass(kw_only=True)
class InstructOptions(ChainArgs):
    # a local chain is one of the two generators, so --model is optional here
    model: Path | None = option(None, help="generate with this local model directory (instead of --api-base)")
    out: Path = option(help="output file: Alpaca JSON records that 'zhllama sft --data' reads")
    num_instructions: int = option(help="how many new instructions to keep")
    seed_tasks: Path | None = option(
        None, help="seed tasks: a self-instruct seed_tasks.jsonl or Alpaca records (default: zhllama's 36 Chinese tasks)"
    )
    overwrite: bool = option(False, help="start over: discard the work file of an earlier run and replace --out")
    language: str = option("zh", choices=LANGUAGES, help="language the new tasks are asked for in")
    seeds_per_prompt: int = option(3, help="seed tasks shown in each prompt")
    generated_per_prompt: int = option(2, help="already kept tasks shown in each prompt, at most")
    tasks_per_prompt: int = option(10, help="new tasks asked for in each prompt")
    rouge_threshold: float = option(0.7, help="drop a task whose ROUGE-L to a kept or seed instruction is at least this")
    rouge_unit: str = option("char", choices=ROUGE_UNITS, help="ROUGE-L tokens of Chinese text: characters or jieba words")
    min_instruction_length: int = option(3, help="drop instructions shorter than this (Chinese characters / English words)")
    max_instruction_length: int = option(150, help="drop instructions longer than this (Chinese characters / English words)")
    max_requests: int | None = option(
        None, help="stop after this many requests even if fewer tasks were kept (default: 5x the requests needed, at least 10)"
    )
    api_base: str | None = option(None, help="OpenAI-compatible base URL, e.g. https://api.openai.com/v1 (key: $OPENAI_API_KEY)")
    api_model: str | None = option(None, help="model name the endpoint serves")
    api_completions: bool = option(False, help="POST the prompt to /completions instead of /chat/completions")
    concurrency: int = option(4, help="requests in flight at once (API)")
    request_timeout: float = option(120.0, help="seconds to wait for one answer before retrying (API)")
    max_retries: int = option(5, help="retries of a request after a 429, a 5xx, a timeout or a refused connection (API)")
    retry_backoff: float = option(1.0, help="seconds before the first retry, doubling each time (API)")
    template: str | None = option(None, help="prompt template of the local chain (default: the one recorded with it)")
    raw: bool = option(False, help="send the prompt to the local chain as plain text, without a template")
    batch_size: int = option(4, help="prompts generated together (local chain)")
    temperature: float = option(1.0, help="sampling temperature (0: greedy)")
    top_p: float = option(1.0, help="nucleus sampling: keep the likeliest tokens up to this probability mass")
    max_tokens: int = option(2048, help="most tokens in one answer")
    seed: int = option(0, help="random seed for choosing examples and for local sampling")

    def problems(self) -> list[str]:
        from zhllama.sft.templates import TEMPLATES

        found: list[str] = []
        at_least(found, "--num-instructions", self.num_instructions, 1)
        if (self.api_base is None) == (self.model is None):
            found.append("give either --api-base URL --api-model NAME (an endpoint) or --model DIR (a local chain)")
        if self.api_base is not None:
            if not self.api_base.startswith(("http://", "https://")):
                found.append(f"--api-base must be an http:// or https:// URL (got {self.api_base!r})")
            if not self.api_model:
                found.append("--api-base needs --api-model NAME (the model the endpoint serves)")
        if self.model is None and (self.adapter or self.template or self.raw):
            found.append("--adapter, --template and --raw apply to a local --model only")
        if self.raw and self.template:
            found.append("--raw sends plain text; drop --template")
        if self.template is not None and self.template not in TEMPLATES:
            found.append(f"unknown template '{self.template}'; known templates: {', '.join(TEMPLATES)}")
        for flag, value, minimum in (
            ("--seeds-per-prompt", self.seeds_per_prompt, 1),
            ("--generated-per-prompt", self.generated_per_prompt, 0),
            ("--tasks-per-prompt", self.tasks_per_prompt, 1),
            ("--min-instruction-length", self.min_instruction_length, 1),
            ("--max-requests", self.max_requests, 1),
            ("--concurrency", self.concurrency, 1),
            ("--max-retries", self.max_retries, 0),
            ("--retry-backoff", self.retry_backoff, 0),
            ("--batch-size", self.batch_size, 1),
            ("--temperature", self.temperature, 0),
            ("--max-tokens", self.max_tokens, 1),
        ):
            at_least(found, flag, value, minimum)
        if self.max_instruction_length < self.min_instruction_length:
            found.append("--max-instruction-length must be at least --min-instruction-length")
        if not 0 < self.rouge_threshold <= 1:
            found.append(f"--rouge-threshold must be in (0, 1], got {self.rouge_threshold}")
        if not 0 < self.top_p <= 1:
            found.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.request_timeout <= 0:
            found.append(f"--request-timeout must be positive, got {self.request_timeout}")
        if self.out.is_dir():
            found.append(f"--out {self.out} is a directory; give a file name such as {self.out / 'instructions.json'}")
        return found

    @property
    def request_budget(self) -> int:
        return self.max_requests or max(10, 5 * math.ceil(self.num_instructions / self.tasks_per_prompt))


def work_file_for(out: Path) -> Path:
    """``NAME.work.jsonl`` beside ``--out NAME.json``: the records kept so far."""
    return out.with_name(out.stem + ".work.jsonl")


def manifest_file_for(out: Path) -> Path:
    """``NAME.zhllama.json`` beside ``--out NAME.json`` (a file output has no directory of its own)."""
    return out.with_name(out.stem + ".zhllama.json")


@dataclass
class WorkState:
    """What the work file holds: the kept tasks and the counts of every reply read so far."""

    kept: list[Task] = field(default_factory=list)
    requests: int = 0
    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)


def read_work_file(path: Path) -> WorkState:
    """The state an earlier run left; a last line cut off by a kill is removed from the file."""
    state = WorkState()
    if not path.is_file():
        return state
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as fh:
            fh.truncate(len(data))
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if REPLY_COUNTS in record:
                counts = record[REPLY_COUNTS]
                state.requests += 1
                state.candidates += int(counts["candidates"])
                state.dropped.update({str(k): int(v) for k, v in counts["dropped"].items()})
            else:
                state.kept.append(Task(str(record["instruction"]), str(record["input"]), str(record["output"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise ZhllamaError(
                f"{path}:{number}: not a line written by zhllama instruct (a record with instruction, input and output, "
                "or reply_counts); move the file away or pass --overwrite to start over"
            ) from e
    return state


@dataclass
class InstructResult:
    """What one run did; counts include the replies of the runs it continued."""

    out: Path
    work_file: Path
    manifest: Path
    wanted: int
    kept: int
    resumed_from: int
    requests: int
    requests_this_run: int
    candidates: int
    dropped: dict[str, int]
    seconds: float
    generator: str

    def summary(self) -> str:
        resumed = f", continuing {self.resumed_from} kept by an earlier run" if self.resumed_from else ""
        lines = [
            f"kept {self.kept} of {self.wanted} instructions from {self.generator} -> {self.out}",
            f"{self.requests} requests ({self.requests_this_run} in this run{resumed}), {self.candidates} tasks examined, "
            f"{self.seconds:.1f} s",
            f"dropped: {counts_line(Counter(self.dropped))}",
            f"work file {self.work_file}, manifest {self.manifest}",
        ]
        if self.kept < self.wanted:
            lines.append(f"stopped at the request limit (--max-requests) with {self.wanted - self.kept} still wanted; rerun to continue")
        return "\n".join(lines)


class _Run:
    """The mutable state of one run: pool of kept tasks, counts, work file, progress bar."""

    def __init__(self, options: InstructOptions, seeds: list[Task], state: WorkState, work_file: Path):
        from tqdm import tqdm

        self.options, self.seeds, self.state = options, seeds, state
        self.filter = TaskFilter(
            options.rouge_threshold, options.min_instruction_length, options.max_instruction_length, options.rouge_unit
        )
        for task in [*seeds, *state.kept]:
            self.filter.add(task)
        # a resumed run must not draw the prompts of the run it continues
        self.rng = random.Random(options.seed * 1_000_003 + state.requests)
        self.sent = 0
        self.work = open(work_file, "a", encoding="utf-8")
        self.progress = tqdm(total=options.num_instructions, initial=len(state.kept), desc="instruct", unit="task", disable=None)
        self._show()

    @property
    def missing(self) -> int:
        return self.options.num_instructions - len(self.state.kept)

    def requests_wanted(self, in_flight: int = 0) -> int:
        """Requests worth sending now: enough for the missing tasks if every one were kept, within the budget."""
        needed = math.ceil(self.missing / self.options.tasks_per_prompt) - in_flight
        return max(0, min(needed, self.options.request_budget - self.sent))

    def prompt(self) -> str:
        o = self.options
        examples = self.rng.sample(self.seeds, min(o.seeds_per_prompt, len(self.seeds)))
        examples += self.rng.sample(self.state.kept, min(o.generated_per_prompt, len(self.state.kept)))
        self.sent += 1
        return build_prompt(examples, o.tasks_per_prompt, o.language)

    def take(self, reply: str) -> None:
        """Parse and filter one reply; append what is kept, then the reply's counts, to the work file."""
        parsed, dropped, kept, examined = parse_reply(reply), Counter(), [], 0
        dropped[UNPARSEABLE] += int(parsed.unparseable)
        dropped[MALFORMED] += parsed.malformed
        for task in parsed.tasks:
            if len(kept) == self.missing:
                break  # the rest of the reply is not needed (nor counted)
            examined += 1
            reason = self.filter.reason_to_drop(task)
            if reason is None:
                kept.append(task)
            else:
                dropped[reason] += 1
        dropped = +dropped
        counts = {"candidates": examined, "dropped": dict(dropped)}
        lines = [json.dumps(t.as_record(), ensure_ascii=False) for t in kept]
        lines.append(json.dumps({REPLY_COUNTS: counts}, ensure_ascii=False))
        self.work.write("\n".join(lines) + "\n")  # one write per reply: a kill cuts at most its last line
        self.work.flush()
        self.state.kept += kept
        self.state.requests += 1
        self.state.candidates += examined
        self.state.dropped.update(dropped)
        self.progress.update(len(kept))
        self._show()

    def _show(self) -> None:
        self.progress.set_postfix(asked=self.state.requests, dropped=sum(self.state.dropped.values()), refresh=False)

    def close(self) -> None:
        self.progress.close()
        self.work.close()


def _run_api(run: _Run, generator) -> None:
    pool = ThreadPoolExecutor(max_workers=generator.concurrency, thread_name_prefix="instruct-api")
    pending: set = set()
    try:
        while run.missing > 0:
            for _ in range(min(generator.concurrency - len(pending), run.requests_wanted(len(pending)))):
                pending.add(pool.submit(generator.complete, run.prompt()))
            if not pending:
                return
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                run.take(future.result())
    finally:
        generator.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


def _run_local(run: _Run, generator) -> None:
    while run.missing > 0 and (count := min(generator.batch_size, run.requests_wanted())) > 0:
        for reply in generator.complete_batch([run.prompt() for _ in range(count)]):
            run.take(reply)


def _make_generator(options: InstructOptions):
    if options.api_base is not None:
        from .api import ApiGenerator

        return ApiGenerator(
            options.api_base, options.api_model, options.api_completions, options.temperature, options.top_p,
            options.max_tokens, options.request_timeout, options.max_retries, options.retry_backoff, options.concurrency,
        )  # fmt: skip
    from .local import LocalGenerator

    return LocalGenerator(
        options.load(), options.template, options.raw, options.temperature, options.top_p, options.max_tokens,
        options.batch_size, options.seed,
    )  # fmt: skip


def _write_outputs(options: InstructOptions, state: WorkState, manifest_path: Path, **facts) -> None:
    records = [t.as_record() for t in state.kept[: options.num_instructions]]
    with atomic_output_file(options.out) as tmp:
        tmp.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    # write_manifest writes DIR/zhllama.json; a file output's manifest is NAME.zhllama.json beside it
    with tempfile.TemporaryDirectory(dir=manifest_path.parent, prefix=f".{manifest_path.name}.") as scratch:
        write_manifest(scratch, command="instruct", options=options, **facts)
        os.replace(Path(scratch) / MANIFEST, manifest_path)


def generate_instructions(options: InstructOptions) -> InstructResult:
    """Generate new instruction records (Alpaca JSON for 'zhllama sft') from seed tasks, with an
    OpenAI-compatible endpoint or a local model chain, as self-instruct and Stanford Alpaca did.

    See the module docstring for the loop and the files written. Raises :class:`ZhllamaError`
    for bad seeds, an endpoint that fails after its retries or answers non-JSON, a chain that
    cannot be loaded, or a run that kept nothing; whatever was kept stays in the work file.
    """
    started = time.time()
    out = options.out.expanduser()
    work_file, manifest_path = work_file_for(out), manifest_file_for(out)
    if out.exists() and not work_file.exists() and not options.overwrite:
        raise ZhllamaError(f"{out}: output file exists (and no work file {work_file.name} to continue); pass --overwrite to replace it")
    seeds = read_seed_tasks(options.seed_tasks)
    if options.overwrite:
        work_file.unlink(missing_ok=True)
    state = read_work_file(work_file)
    resumed_from = len(state.kept)
    requests_before = state.requests
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZhllamaError(f"{out}: cannot create the directory {out.parent}: {e.strerror or e}") from e
    generator = _make_generator(options)
    run = _Run(options, seeds, state, work_file)
    try:
        if options.api_base is not None:
            _run_api(run, generator)
        else:
            _run_local(run, generator)
    finally:
        run.close()
    if not state.kept:
        raise ZhllamaError(
            f"no instruction kept after {state.requests} requests ({counts_line(state.dropped)}); the replies hold no "
            "new task in a format zhllama reads: try a stronger model"
            + (", --template or --raw" if options.model is not None else "")
        )
    describe = generator.describe()
    figures = {
        "wanted": options.num_instructions,
        "kept": min(len(state.kept), options.num_instructions),
        "resumed_from": resumed_from,
        "requests": state.requests,
        "requests_this_run": state.requests - requests_before,
        "tasks_examined": state.candidates,
        "dropped": dict(state.dropped),
        "seconds_this_run": round(time.time() - started, 2),
    }
    sampling = {k: getattr(options, k) for k in ("temperature", "top_p", "max_tokens", "seed", "language", "tasks_per_prompt")}
    _write_outputs(
        options, state, manifest_path,
        inputs={"seed_tasks": options.seed_tasks or BUNDLED_SEEDS, "work_file": work_file},
        figures=figures, sampling=sampling, generator=describe,
        **({"chain": generator.chain.describe()} if options.model is not None else {}),
    )  # fmt: skip
    return InstructResult(
        out=out, work_file=work_file, manifest=manifest_path, wanted=options.num_instructions, kept=figures["kept"],
        resumed_from=resumed_from, requests=state.requests, requests_this_run=figures["requests_this_run"],
        candidates=state.candidates, dropped=dict(state.dropped), seconds=time.time() - started,
        generator=generator.label(),
    )  # fmt: skip
