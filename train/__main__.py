"""Command line: python -m train {sft,rm,ppo,dpo,all,eval-rm,report} [options]; `python -m train STAGE --help`
lists options.

Errors a user can cause (core.errors.UserError and its kinds) end in one sentence on stderr and
exit code 2; anything else ends in one line pointing at the run's train.log, which holds the
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from core.options import add_arguments
    from train.config import STAGES

    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    # the deepspeed launcher passes --local_rank before the stage; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, cls in STAGES.items():
        sub = stages.add_parser(name, help=cls.__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_arguments(sub, cls)
        if getattr(cls, "POSITIONAL", None):  # e.g. `report RUN`, the same as `report --run RUN`
            sub.add_argument("positional", nargs="?", metavar=cls.POSITIONAL.upper(),
                             help=f"same as --{cls.POSITIONAL}")
    return parser


def runner(stage: str):
    if stage == "sft":
        from train.sft import main
    elif stage == "rm":
        from train.reward import main
    elif stage == "ppo":
        from train.ppo import main
    elif stage == "dpo":
        from train.dpo import main
    elif stage == "all":
        from train.pipeline import main
    elif stage == "eval-rm":
        from train.reward import evaluate_main as main
    elif stage == "report":
        from train.report import main
    return main


def quiet_libraries() -> None:
    """Keep the console to our own lines and progress bar."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def mark_failed(output: str, message: str, trace: str) -> None:
    """Record the failure in the run folder: a run this process started, or a folder the app's
    launcher made for it that holds no run yet (a failure before the run began). Any other
    folder, an earlier run in it included, is left as it was."""
    from core.runs import read_status, write_json_atomic
    from train.rundir import RunDir

    folder = Path(output) if output else None
    if folder is None or not folder.is_dir():
        return
    status = read_status(folder)
    if status.get("pid") == os.getpid():
        run = RunDir(folder)
        run.log(trace, echo=False)
        run.status("failed", error=message)
    elif not status and (folder / "launch.json").is_file():
        write_json_atomic(folder / "status.json", {"state": "failed", "error": message,
                                                   "pid": os.getpid()})


def main(argv=None) -> int:
    from core.errors import UserError
    from core.process import tune_process

    args = build_parser().parse_args(argv)
    positional = vars(args).pop("positional", None)
    if positional is not None:
        from train.config import STAGES

        setattr(args, STAGES[args.stage].POSITIONAL, positional)
    rank = os.environ.get("RANK", "0")
    cfg = None
    try:
        tune_process()  # before torch allocates anything
        from core.options import from_namespace
        from train.config import STAGES

        quiet_libraries()
        cfg = from_namespace(STAGES[args.stage], args)
        runner(args.stage)(cfg)
        return 0
    except Exception as err:  # noqa: BLE001  (the one place that turns errors into messages)
        user_error = isinstance(err, UserError)
        message = str(err) if user_error else f"{type(err).__name__}: {err}"
        output = getattr(cfg, "output", "")
        mark_failed(output, message, traceback.format_exc())
        log = Path(output) / "train.log" if output else None
        where = f" (traceback in {log})" if log and log.is_file() and not user_error else ""
        print(f"{'' if rank == '0' else f'[rank {rank}] '}error: {message}{where}", file=sys.stderr)
        return 2 if user_error else 1


if __name__ == "__main__":
    try:
        code = main()
        if code:  # the error is printed: end now, as the server does, for a library's C++ thread
            sys.stdout.flush()  # still alive would abort Python's shutdown after the message
            sys.stderr.flush()  # ("terminate called without an active exception", exit -6)
            os._exit(code)
        sys.exit(code)
    except KeyboardInterrupt:  # Ctrl-C before a stage installs its own handler (imports, loading)
        print("error: interrupted (Ctrl-C) before training began: nothing was trained.", file=sys.stderr)
        sys.exit(130)
