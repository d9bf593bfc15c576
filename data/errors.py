"""The one exception type data/ raises for a problem the user can fix (no usable images, a bad multiply.txt, a
validation split that leaves nothing to train on). Its text says what was found, what was expected and what to
do; the entry point reports it like the trainer's own errors. data/ imports nothing of trainer/."""


class DataError(Exception):
    """A problem with the training data that the user can fix."""
