"""Stop requests: SIGINT (Ctrl-C), SIGTERM (what docker, systemd, SLURM and Kubernetes send) and SIGHUP (a closed
terminal or ssh session, for a run started without nohup) ask the training loop to stop after the current
optimizer step and save an interrupted model with its training state. A second Ctrl-C aborts at once, removing
the partial output of a save it cuts short (any more Ctrl-C wait for that clean-up); a second SIGTERM or SIGHUP
changes nothing (the stop is already under way). Once a stopped run's loop is left, Ctrl-C is ignored while the
program ends.

Sent to the whole process group, the signals reach the DataLoader workers too; those ignore them (data/dataset.py)
and leave the stop to the main process, which shuts them down as it ends. Sampling and validation look at the
request between denoising steps and batches, so a stop never waits for a long prompt list.

Under `accelerate launch` (torch's elastic launcher) a stop signal reaches the launcher, which sends it on to each
process, waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (30 by default) for them, kills what is left, and then ends
with exit status 1 and a traceback of its own (SignalException), whatever the processes did: nothing in them can
change that. So the first stop's line says so there, and that the `Interrupted at step` line tells that the save
is whole (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import os
import signal

from common.console import say_from_signal_handler
from data.workers import STOP_SIGNALS
from trainer.errors import UserError


class Aborted(UserError):
    """A second Ctrl-C: the run ends now, without the interrupted save."""

    exit_code = 128 + signal.SIGINT


class StopRequest:
    """Installed for the training loop's lifetime (`with StopRequest() as stop:`); `stop.requested` turns true
    at the first signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.aborting = False
        self.saving_final = False  # the run's final save is being written: a stop then only cuts what follows it
        self.final_save: str | None = None  # set once the run's final save is whole: a stop then only cuts the rest
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's code for "ended by this signal": 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP."""
        return 128 + (self.signum or signal.SIGINT)

    def __enter__(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.aborting:  # the abort is under way: a third Ctrl-C must not cut short its clean-up
            return
        if self.requested:
            if signum == signal.SIGINT:
                self.aborting = True
                raise KeyboardInterrupt
            return
        self.signum = signum
        name = signal.Signals(signum).name
        # not `say`: this may run inside a write to the console (common/console.py say_from_signal_handler)
        if self.final_save is not None:
            say_from_signal_handler(f"{name}: the final model is already saved ({self.final_save}); stopping the "
                                    "validation and samples that follow it.")
            return
        if self.saving_final:
            say_from_signal_handler(f"{name}: the final save is being written; the run stops once it is whole, "
                                    "skipping the validation and samples that follow it.")
            return
        say_from_signal_handler(f"{name}: stopping after this step and saving an 'interrupted' model with its "
                                f"training state{launcher_note() or ' (press Ctrl-C again to abort without saving).'}")

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # after a stop (saved, or aborted) the program only ends from here: a further Ctrl-C would cut its exit
            # short with a traceback (from the interpreter's own exit functions, past the last line of ours)
            signal.signal(signum, signal.SIG_IGN if self.requested and signum == signal.SIGINT else handler)


def launcher_note() -> str:
    """What torch's launcher does around the stop, for a process it started (it sets TORCHELASTIC_RUN_ID); "" for
    a process started otherwise. There a second Ctrl-C reaches the launcher alone, not this process."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return ""
    # the launcher reads its grace time from these, in this order (torch.distributed.run's --shutdown-timeout)
    grace = os.environ.get("PET_SHUTDOWN_TIMEOUT") or os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT") or "30"
    return (f". The launcher (accelerate launch) gives the processes {grace} s for it (TORCH_ELASTIC_SHUTDOWN_TIMEOUT "
            "sets more; a save cut short is removed at the next start, the earlier saves stay) and then ends with "
            "exit status 1 and torch's SignalException traceback, whatever the save: the 'Interrupted at step' line "
            "below says the save is whole.")
