"""What haet prints: TensorFlow's native start-up logs filtered by their level.

TensorFlow 2.21 writes its C++ start-up messages (oneDNN, CUDA stubs, CPU features,
`failed call to cuInit` on a machine without a GPU) through absl's C++ logging before
absl is initialized, where `TF_CPP_MIN_LOG_LEVEL` is not applied: setting it, even in
the shell, leaves about ten lines on every start. haet therefore captures the native
standard error while TensorFlow loads and starts its devices, and writes back every
line but the log lines below `TF_CPP_MIN_LOG_LEVEL` (0 info, 1 warnings, 2 errors,
3 all but fatal; haet's default is 3, a value the user set wins). Python warnings
and anything else printed meanwhile are written back as they were.
"""

import contextlib
import os
import re
import sys
import tempfile

# absl/TensorFlow native log lines: a severity letter, then MMDD.
_LOG_LINE = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = {"I": 0, "W": 1, "E": 2, "F": 3}
_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"


def min_log_level():
    """`TF_CPP_MIN_LOG_LEVEL` as an int (3 when unset or not a number)."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    except ValueError:
        return 3


def kept_lines(text, level):
    """The lines of `text` a user at `level` sees: native log lines of a lower
    severity are dropped with their continuation lines; the rest is kept."""
    kept, dropping = [], False
    for line in text.splitlines():
        match = _LOG_LINE.match(line)
        if match:
            dropping = _LEVELS[match.group(1)] < level and match.group(1) != "F"
        elif line.startswith(_PREAMBLE):
            dropping = level >= 1
        elif not line.startswith((" ", "To enable the following instructions")):
            dropping = False
        if not dropping:
            kept.append(line)
    return kept


@contextlib.contextmanager
def native_logs_filtered():
    """Captures the process's standard error (file descriptor 2) inside the block and
    writes back what `kept_lines` keeps at `min_log_level()` when it ends."""
    level = min_log_level()
    if level <= 0:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = kept_lines(captured.read().decode(errors="replace"), level)
            if lines:
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()
