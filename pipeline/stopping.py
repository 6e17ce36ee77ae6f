"""How a run stops: signals, the per-step agreement of all ranks, and the exit codes the launchers read.

A stop request (SIGUSR2 or SIGTERM on any rank, e.g. SLURM's warning before a time limit or a preemption) and a
non-finite loss are local events; every rank must act on them at the same step, or the ranks would wait for each
other in different collectives. So once per step, before the update, all ranks all-reduce [loss, non-finite flag,
stop flag, requeue flag]: a non-finite loss anywhere stops every rank before the update (so that state is never
checkpointed), and a stop anywhere makes all ranks save one checkpoint together and exit with EXIT_STOPPED.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from typing import Any

from pipeline import distributed
from pipeline.distributed import DistEnv

EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 75  # checkpointed on request (preemption, time limit): run again to resume


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; nothing after the last checkpoint was saved."""


class StopRequested(Exception):
    """A stop signal arrived; a checkpoint was saved at `step`. `requeue`: the signal was SIGUSR2 (SLURM's
    warning before a time limit, or a preemption notice), which asks to be continued; SIGTERM only stops."""

    def __init__(self, step: int, requeue: bool) -> None:
        super().__init__(f"stopped on request after step {step}; checkpoint saved, run again to resume")
        self.step, self.requeue = step, requeue


class StopFlag:
    """Set by SIGUSR2 or SIGTERM; read (and all-reduced) at every step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self.requeue = False  # SIGUSR2 seen: stop to be continued (SLURM requeues); SIGTERM alone only stops
        self.installed = False

    def install(self) -> "StopFlag":
        if not self.installed:
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                signal.signal(sig, self._handler)
            self.installed = True
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.requeue = self.requeue or signum == signal.SIGUSR2


STOP = StopFlag()


def install_stop_handlers() -> StopFlag:
    """Catch SIGUSR2/SIGTERM from now on (idempotent); the SLURM task calls this first thing."""
    return STOP.install()


@dataclasses.dataclass(frozen=True)
class StepAgreement:
    """What all ranks agreed on at the end of a step's micro-batches."""

    loss_sum: float  # the micro-batch losses summed over every rank
    stop: bool  # a stop was requested on some rank: save, then stop
    requeue: bool  # ... by SIGUSR2, which asks to be continued
    digest_terms: tuple[float, float]  # pipeline.data.digest_terms summed over every rank


def agree(loss_sum: float, digest_terms: tuple[float, float], stop: StopFlag, env: DistEnv,
          step: int) -> StepAgreement:
    """Collective, before the update of step `step` + 1, in one all-reduce: share this rank's loss, its share of the
    sample digest and its flags; raise NonFiniteLoss on every rank when the loss is not finite on any."""
    total, bad, stops, requeues, low, high = distributed.all_reduce_sum(
        [loss_sum, 0.0 if math.isfinite(loss_sum) else 1.0, 1.0 if stop.requested else 0.0,
         1.0 if stop.requeue else 0.0, *digest_terms], env)
    if bad:
        raise NonFiniteLoss(f"non-finite loss at step {step + 1} (on {int(bad)} rank(s)); stopped before the "
                            f"update, nothing after step {step} was saved")
    return StepAgreement(total, bool(stops), bool(requeues), (low, high))
