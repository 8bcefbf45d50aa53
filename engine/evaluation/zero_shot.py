"""Zero- and few-shot task accuracy through EleutherAI's lm-evaluation-harness (``lm_eval``), on our loaded model.

The model is loaded as ``tritonq eval`` loads it for perplexity (:func:`~tritonq.engine.api.load_evaluation_model`:
fake-quantized float weights, or packed int4 through ``QuantLinear``, with the recorded activation
quantization) and handed to lm-eval's ``HFLM`` as an instance, so the harness scores exactly the model that
tritonq runs rather than reloading the checkpoint its own way (it cannot read our packed layers).

Order of work, so that a bad request fails in seconds: lm-eval is imported (else: install the ``eval`` extra);
the task names are looked up; every task's data is loaded (offline, a dataset missing from the local cache is
an error naming the task); only then is the model loaded and run. While the Hugging Face Hub is unreachable
the datasets library is switched to offline mode for the lookup, so a missing dataset fails at once instead of
after ``datasets``' retries (about 25 s per task here).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import TritonqError

INSTALL_HINT = "pip install 'tritonq[eval]'"
NOT_METRICS = ("alias", "sample_len", "sample_count")  # bookkeeping lm-eval reports beside the metrics


@dataclass
class TaskScore:
    """One task's aggregated metrics (``acc``, ``acc_norm``, ...), their standard errors, and how many examples ran."""

    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    samples: int | None = None


@dataclass
class TaskResults:
    tasks: dict[str, TaskScore]
    num_fewshot: int
    limit: int | float | None
    batch_size: int
    lm_eval_version: str


def import_lm_eval():
    """The ``lm_eval`` module, or a clear error naming the extra that installs it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401 - the model wrapper we need must import too
    except ImportError as exc:
        raise TritonqError(f"task evaluation (--tasks) needs lm-eval, which is not installed ({exc}); "
                           f"install it with: {INSTALL_HINT}") from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """``arc_easy,hellaswag`` -> names; empty names are an error."""
    names = [t.strip() for t in text.split(",")]
    if not names or any(not t for t in names):
        raise TritonqError(f"--tasks {text!r} has an empty task name; give comma-separated names, e.g. "
                           f"--tasks arc_easy,hellaswag")
    return names


@contextlib.contextmanager
def _datasets_offline_if_unreachable() -> Iterator[None]:
    """Offline mode for ``datasets`` and ``huggingface_hub`` while the hub cannot be reached; restored after.

    Both libraries read the setting at import time, so the module constants are set beside the environment."""
    from ..model_io import _hub_reachable, hub_offline

    if hub_offline() or _hub_reachable():
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE,
             getattr(datasets.config, "HF_DATASETS_OFFLINE", None))
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[:2]
        if saved[2] is not None:
            datasets.config.HF_DATASETS_OFFLINE = saved[2]


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs each step at INFO/WARNING (and warns that it was given a model instance); keep errors only."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def task_manager(names: list[str], include_path: list[str] | None = None):
    """An lm-eval ``TaskManager`` that knows every name in ``names``; unknown names are one clear error.

    Indexing lm-eval's own thousands of task files takes about 20 s here, so where ``include_path`` alone
    defines every requested task the built-in ones are not indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(Path(p).expanduser()) for p in include_path or []]
    for p in paths:
        if not Path(p).exists():
            raise TritonqError(f"--include-path {p} does not exist; give a folder (or YAML file) of lm-eval tasks")
    if paths:
        own = TaskManager(include_path=paths, include_defaults=False)
        if all(n in own.all_tasks for n in names):
            return own
    manager = TaskManager(include_path=paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(paths)}" if paths else ""
        raise TritonqError(f"unknown lm-eval task(s) {', '.join(unknown)}: not among lm-eval's "
                           f"{len(manager.all_tasks)} tasks{where}; check the spelling (lm-eval --tasks list) "
                           f"or give --include-path DIR with the task's YAML")
    return manager


def load_tasks(manager, names: list[str]) -> list:
    """Build each task (which loads its data); a task whose data cannot be loaded is an error naming it."""
    tasks = []
    with _datasets_offline_if_unreachable(), _quiet_lm_eval():
        for name in names:
            try:
                loaded = manager.load([name])
            except Exception as exc:  # noqa: BLE001 - datasets/hub/file errors differ by version; one line names the task
                first = (str(exc).strip().splitlines() or [""])[0]
                raise TritonqError(
                    f"cannot load the data of lm-eval task {name!r} ({type(exc).__name__}: {first}); without "
                    f"network access its dataset must already be in the Hugging Face datasets cache (run once "
                    f"where the hub is reachable, or set HF_HOME to a cache that has it), or define the task over "
                    f"local files and pass --include-path") from None
            tasks += list(loaded["tasks"].values())
    return tasks


def _metric_name(key: str) -> str:
    """lm-eval keys are ``metric,filter``; the default filter ``none`` is dropped from the name."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric} ({filt})"


def scores_from_results(results: dict, names: list[str]) -> dict[str, TaskScore]:
    """Per task: the numeric metrics of ``simple_evaluate``'s ``results``, their stderr, the examples that ran."""
    out = {}
    samples = results.get("n-samples") or {}
    for task, values in (results.get("results") or {}).items():
        score = TaskScore()
        for key, value in values.items():
            if key in NOT_METRICS or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                score.stderr[_metric_name(f"{metric.removesuffix('_stderr')},{filt}")] = float(value)
            else:
                score.metrics[_metric_name(key)] = float(value)
        n = samples.get(task) or {}
        count = n.get("effective", n.get("original")) if isinstance(n, dict) else None
        score.samples = int(count if count is not None else values.get("sample_len", 0)) or None
        out[task] = score
    missing = [n for n in names if n not in out]
    if missing:
        raise TritonqError(f"lm-eval returned no results for {', '.join(missing)}")
    return out


def run_tasks(model_name: str, tasks: list[str], limit: int | float | None = None, batch_size: int = 1,
              num_fewshot: int = 0, include_path: list[str] | None = None, device: str = "auto",
              dtype: str = "auto", trust_remote_code: bool = False, act_bits: int | None = None,
              act_scheme: str | None = None, act_sym: bool | None = None) -> TaskResults:
    """Score ``model_name`` (a tritonq output, packed checkpoint, hub id or ``smollm2``) on lm-eval ``tasks``.

    ``limit``: at most this many examples per task (a float in (0, 1): that fraction), as lm-eval's own
    ``--limit``; scores on a limit are not comparable with published full-task numbers."""
    if batch_size < 1:
        raise TritonqError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and not (limit >= 1 or 0 < limit < 1):
        raise TritonqError(f"--limit must be a count of at least 1 or a fraction in (0, 1), got {limit}")
    if num_fewshot < 0:
        raise TritonqError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    lm_eval = import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from ..api import load_evaluation_model
    from ..model_io import load_tokenizer, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer = load_tokenizer(model_name, trust_remote_code)  # a bad model name fails before the tasks load
    manager = task_manager(tasks, include_path)
    loaded = load_tasks(manager, tasks)
    model = load_evaluation_model(model_name, dev, dt, trust_remote_code, act_bits, act_scheme, act_sym)
    model.to(dev)
    model.eval()
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=loaded, task_manager=manager, num_fewshot=num_fewshot,
                                          limit=limit, log_samples=False, batch_size=batch_size)
    if results is None:
        raise TritonqError("lm-eval returned no results")
    version = getattr(lm_eval, "__version__", "unknown")
    return TaskResults(scores_from_results(results, [t.task_name for t in loaded]), num_fewshot, limit,
                       batch_size, version)


def task_table(results: TaskResults) -> str:
    """Markdown: one row per task and metric, with its standard error and the number of examples scored."""
    lines = ["| task | metric | value | stderr | examples |", "| --- | --- | --- | --- | --- |"]
    for task, score in results.tasks.items():
        for metric, value in score.metrics.items():
            err = score.stderr.get(metric)
            lines.append(f"| {task} | {metric} | {value:.4f} | {'-' if err is None else f'{err:.4f}'} | "
                         f"{'-' if score.samples is None else score.samples} |")
    return "\n".join(lines)
