"""The one exception type data/ raises for a problem the user can fix (no usable images, a bad multiply.txt, a
validation split that leaves nothing to train on, a file changed during the run: `read_during_run`). Its text
says what was found, what was expected and what to do; the entry point reports it like the trainer's own errors.
data/ imports nothing of trainer/."""


class DataError(Exception):
    """A problem with the training data that the user can fix."""

    def __str__(self) -> str:
        # raised in a DataLoader worker, torch raises it again in the main process with the worker's traceback
        # before it ("Caught DataError in DataLoader worker process 0. Original Traceback ... DataError: <text>")
        text = super().__str__()
        said = f"{type(self).__module__}.{type(self).__qualname__}: "
        return text.rsplit(said, 1)[1].strip() if "Original Traceback" in text and said in text else text


def read_during_run(read, path, what: str):
    """`read()`, a file the run already checked at its start; a file that can no longer be read was changed or
    deleted since, and is said in one DataError naming it (`what`: "image", "mask"). Latent-cache entries have
    their own handling (data/dataset.py CachedLatents: encoded again where the VAE is at hand)."""
    try:
        return read()
    except Exception as err:  # PIL, safetensors and the OS each raise their own; all mean the file is not usable
        reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
                  if str(err).strip() else type(err).__name__)
        raise DataError(
            f"the {what} {path} can no longer be read ({reason}): it was changed or deleted during the run. Put it "
            "back or remove it, then continue from the run's last save with --resume_state findlast."
        ) from None
