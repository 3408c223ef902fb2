"""Command line: python -m train {sft,rm,ppo,all,eval-rm} [options]; `python -m train STEP --help` lists options.

Errors a user can cause end in one sentence on stderr and exit code 2; anything else ends in
one line pointing at the run's train.log, which holds the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

USER_ERRORS = ("ConfigError", "DataError", "ModelError")


def build_parser() -> argparse.ArgumentParser:
    from train import config

    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    # the deepspeed launcher passes --local_rank before the step; LOCAL_RANK says the same
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    steps = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, cls in config.STEPS.items():
        sub = steps.add_parser(name, help=cls.__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        config.add_arguments(sub, cls)
    return parser


def runner(step: str):
    if step == "sft":
        from train.sft import main
    elif step == "rm":
        from train.reward import main
    elif step == "ppo":
        from train.ppo import main
    elif step == "all":
        from train.pipeline import main
    elif step == "eval-rm":
        from train.reward import evaluate_main as main
    return main


def quiet_libraries() -> None:
    """Keep the console to our own lines and progress bar."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def mark_failed(output: str, message: str, trace: str) -> None:
    """Record the failure in the run folder, but only in a run this process started."""
    from train.rundir import RunDir, read_status

    if output and read_status(output).get("pid") == os.getpid():
        run = RunDir(output)
        run.log(trace, echo=False)
        run.status("failed", error=message)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    cfg = None
    try:
        from train import config

        quiet_libraries()
        cfg = config.from_namespace(config.STEPS[args.step], args)
        runner(args.step)(cfg)
        return 0
    except Exception as err:  # noqa: BLE001  (the one place that turns errors into messages)
        user_error = type(err).__name__ in USER_ERRORS
        message = str(err) if user_error else f"{type(err).__name__}: {err}"
        output = getattr(cfg, "output", "")
        mark_failed(output, message, traceback.format_exc())
        where = f" (traceback in {Path(output) / 'train.log'})" if output and not user_error else ""
        print(f"{'' if rank == '0' else f'[rank {rank}] '}error: {message}{where}", file=sys.stderr)
        return 2 if user_error else 1


if __name__ == "__main__":
    sys.exit(main())
