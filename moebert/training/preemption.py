"""Preemption: SIGTERM (what Slurm, Kubernetes and spot instances send before they kill) and SIGINT (Ctrl-C) stop
training after the current step with a checkpoint, and the run says how to resume."""

import os
import signal
import threading
from pathlib import Path

import torch
from accelerate.logging import get_logger

logger = get_logger(__name__)


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run from its latest checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume_from_checkpoint"):
            skip = arg == "--resume_from_checkpoint"
            continue
        kept.append(arg)
    return " ".join(["python", *kept, "--resume_from_checkpoint", "latest"])


class TrainingStopped(Exception):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.name, self.step, self.checkpoint = signum, signal.Signals(signum).name, step, checkpoint


class StopRequest:
    """SIGTERM (what Slurm, Kubernetes and spot instances send before they kill) and SIGINT (Ctrl-C): once training
    steps (`arm`), the first asks it to stop after the current step with a checkpoint, and a second one exits at once;
    before that (loading, stored stem states: minutes on a large base) nothing is there to keep, so one exits at
    once."""

    def __init__(self):
        self.signum, self.armed = None, False
        in_main_thread = threading.current_thread() is threading.main_thread()  # the only one that may set handlers
        signals = (signal.SIGTERM, signal.SIGINT) if in_main_thread else ()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def arm(self):
        """From now on a signal stops training after the current step."""
        self.armed = True

    def _handle(self, signum, frame):
        if self.signum is not None or not self.armed:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        logger.warning(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again to "
                       "exit at once)", main_process_only=False)  # each process says what it was sent

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        asked = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        signums = accelerator.gather(asked)
        self.signum = self.signum or int(signums.max())
        return bool(signums.max())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
