"""A pre-imported parent for the CLI tests: it imports torch, transformers, peft, datasets,
wandb, Hydra and detox_exp once, then forks one child per request, and the child runs the
real entrypoint (``detox_exp.cli.main``) with the request's argv, cwd and environment.

Each run still gets a process of its own (its own globals, exit code, signals: a run that
SIGKILLs itself reports -9), but skips the 10-15 s of imports that ``python -m detox_exp``
pays. The parent never runs a torch op, so no thread pool exists to be broken by the fork.

A request may start several children at once, the ranks of a multi-process run as torchrun
starts them (each with its own ``RANK`` / ``LOCAL_RANK`` in its environment): as torchrun's
agent does, the first rank that fails stops the others (SIGTERM).

Protocol, one JSON object per line: the test writes ``{"children": [{"argv", "cwd", "env",
"stdout", "stderr"}, ...]}`` to stdin; the parent answers ``{"pids": [...]}`` at the forks
and ``{"returncode": ...}`` when all have ended: the child's own code for one child, else
the first non-zero code (0 if none).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import sys
import threading
import traceback


def preload() -> None:
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers
    import wandb  # noqa: F401

    import detox_exp.cli  # noqa: F401
    import detox_exp.demo.assets  # noqa: F401
    import detox_exp.evaluation.report  # noqa: F401
    import detox_exp.frontier.stage  # noqa: F401
    import detox_exp.guided.trainer  # noqa: F401
    import detox_exp.pipeline  # noqa: F401
    import detox_exp.ppo.trainer  # noqa: F401
    import detox_exp.reward.training  # noqa: F401
    import detox_exp.sweeps  # noqa: F401
    import detox_exp.training.saving  # noqa: F401

    # transformers imports its model classes lazily, on first attribute access
    for name in (
        "T5ForConditionalGeneration",
        "RobertaForSequenceClassification",
        "AutoModelForSeq2SeqLM",
        "AutoModelForSequenceClassification",
        "AutoTokenizer",
        "PreTrainedTokenizerFast",
    ):
        getattr(transformers, name)

    # imported on first use by the evaluation (ROUGE: rouge_score, nltk, scipy) and the
    # frontier's plot (matplotlib): ~1 s per run
    import rouge_score.rouge_scorer  # noqa: F401

    warm_matplotlib()
    # imported by wandb.init, offline too: ~1.5 s per run with logger=wandb (wandb's own
    # modules, so looked up by name: a wandb without them is not an error)
    for name in (
        "wandb.sdk.launch.inputs.internal",
        "wandb.sdk.lib.gitlib",
        "requests",
        "opentelemetry.exporter.otlp.proto.http.metric_exporter",
        "opentelemetry.exporter.otlp.proto.http._log_exporter",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    assert threading.active_count() == 1, "no thread may exist at a fork"


def warm_matplotlib() -> None:
    """Draw a small figure with a log axis, as the frontier's plot does: matplotlib, its
    fonts and the mathtext parser (the log axis's tick labels) are then loaded in every
    child (another ~1 s per run)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    ax = fig.add_subplot()
    ax.plot([0.01, 10.0], [0.0, 1.0])
    ax.set_xscale("log")
    ax.twinx().set_ylabel("y")
    fig.tight_layout()
    fig.savefig(io.BytesIO(), format="png")


def child(request: dict) -> None:
    """Runs in the forked child, as ``python -m detox_exp`` would; never returns."""
    code = 1
    try:
        os.chdir(request["cwd"])
        sys.path[0] = request["cwd"]  # where ``python -m`` puts the working directory
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        import detox_exp
        from detox_exp.cli import main

        sys.argv = [os.path.join(os.path.dirname(detox_exp.__file__), "__main__.py")]
        sys.argv += request["argv"]
        try:
            main()
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"): printed, exit code 1
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    preload()
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        pids = []
        for request in json.loads(line)["children"]:
            pid = os.fork()
            if pid == 0:
                child(request)
            pids.append(pid)
        print(json.dumps({"pids": pids}), file=out, flush=True)
        print(json.dumps({"returncode": wait_all(pids)}), file=out, flush=True)


def wait_all(pids: list[int]) -> int:
    """Wait for every child; the first to fail stops the others."""
    running, failed = set(pids), None
    while running:
        pid, status = os.wait()
        if pid not in running:
            continue
        running.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and failed is None:
            failed = code
            for other in running:
                os.kill(other, signal.SIGTERM)
    return failed or 0


if __name__ == "__main__":
    serve()
