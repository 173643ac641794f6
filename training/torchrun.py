"""torchrun as the pipeline launches a stage: `python -m training.torchrun ARGS` takes torchrun's arguments
and runs torchrun's own launcher (torch.distributed.run) with them, unchanged. Two things differ, both in
what it prints and returns when a rank stops early:

- torchrun answers any non-zero exit of a rank, and a Ctrl-C, with a traceback of its own and a failure
  report. A stage has already said what went wrong in one line (or that it paused, which is no failure at
  all), so that report only buries it. Here it is one line naming the rank and its exit status (or the
  signal that stopped it), and nothing for a pause or a Ctrl-C.
- torchrun exits with 1 whatever the rank's status was. Here the launcher exits with the status of the
  rank that stopped first, so the pipeline can tell a paused stage (EXIT_PAUSED) from a failed one.

Multi-node runs are launched with torchrun itself (training/README.md); this is the same launcher.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import determine_local_world_size, parse_args, run

from .common import EXIT_PAUSED

# The logger that prints "failed (exitcode: N) ..." and "Sending process N closing signal SIGTERM" (the
# other ranks, stopped as they should be) around the failure report; its warnings about workers that would
# not stop are kept.
_WORKER_LOGGER = "torch.distributed.elastic.multiprocessing.api"
_ROUTINE = ("failed (exitcode", "Sending process", "Closing process")


def _not_routine(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_ROUTINE)


def exit_status(code: int) -> int:
    """A rank's exit code as a process exit status: a signal (negative code) as 128 + its number."""
    if code < 0:
        return 128 - code
    return code if 0 < code < 256 else 1


def describe(code: int) -> str:
    """How a rank ended, for the one line: a stage that exits says why itself; a signal ends it silently."""
    if code >= 0:
        return f"exited with status {code} first; its message is above"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    hint = " (out of memory? the system kills with it)" if -code == signal.SIGKILL else ""
    return f"was stopped by {name} first{hint}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # What torchrun itself would do for several processes, set here so it does not print its banner.
    if "OMP_NUM_THREADS" not in os.environ and determine_local_world_size(args.nproc_per_node) > 1:
        os.environ["OMP_NUM_THREADS"] = "1"
    logging.getLogger(_WORKER_LOGGER).addFilter(_not_routine)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode != EXIT_PAUSED:
            print(f"[torchrun] {e.name}: rank {rank} {describe(failure.exitcode)}", file=sys.stderr, flush=True)
        return exit_status(failure.exitcode)
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the stages checkpoint and say so themselves
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
