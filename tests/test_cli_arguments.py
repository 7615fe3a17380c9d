"""`python -m fusedopt <command>` with bad values: a one-line error (argparse's usage error or
the command's own message) before any work, never a traceback from inside the command."""
import contextlib
import io

import pytest

from fusedopt.__main__ import main

BAD = [
    ([], "choose a command"),
    (["demo", "--steps", "0"], "--steps: expected a positive integer"),
    (["demo", "--heads", "3", "--d-model", "32"], "multiple of --heads"),
    (["demo", "--context", "100000"], "too long for the corpus"),
    (["demo", "--batch-size", "-2"], "--batch-size: expected a positive integer"),
    (["demo", "--optimizers", ""], "--optimizers names none"),
    (["bench", "--sizes", "0.5"], "whole numbers of M"),
    (["bench", "--sizes", "-1"], "whole numbers of M"),
    (["bench", "--mix-scale", "-5"], "--mix-scale: expected a positive integer"),
    (["memory", "--params", "0.4"], "params >= 1"),
    (["memory", "--params", "inf"], "params >= 1"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "no command" for a, _ in BAD])
def test_bad_arguments_give_one_clear_line(argv, message):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(argv)
    text = err.getvalue() + (exc.value.code if isinstance(exc.value.code, str) else "")
    assert message in text
    assert "Traceback" not in text
