"""The exception types that reach the user as a message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (a missing model, an unusable data folder, a full disk). The text says what was
    found, what was expected and what to do; train.py prints it and exits with `exit_code`."""

    exit_code = 1


def bulleted(problems: list[str]) -> str:
    """Problems as a list, one "  - " item each; an item's own further lines (a list of what was looked for)
    indented under it, so that they read as part of it."""
    return "\n".join("  - " + problem.replace("\n", "\n    ") for problem in problems)


class ProblemsError(UserError):
    """Every problem found before anything ran (the preflight), reported together like config errors (exit 2)."""

    exit_code = 2

    def __init__(self, problems: list[str], heading: str = "before training started"):
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{count} found {heading}:\n" + bulleted(problems))


def file_problems(what: str, problems: list[str]) -> ProblemsError:
    """Every problem of one file the config names (`what`: its key and path), each line naming the file, so that
    the preflight can list them beside the others."""
    return ProblemsError([f"{what}: {p}" for p in problems], heading=f"in {what}")
