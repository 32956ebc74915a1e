"""Every error a user can cause, and how a script reports it.

ConfigError (a key or value), DataError (a data file, named with its line or
record) and UserError (anything else: paths, settings, a model directory) end
a script through run_cli with one line on stderr and exit code 2, never a
traceback. This module imports nothing of the package, so any module can use it.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable


class ConfigError(ValueError):
    """A bad key or value in the YAML file or on the command line."""


class DataError(Exception):
    """Bad or missing data. The message names the file (and line or record)."""


class UserError(Exception):
    """A problem with the user's input (data, paths, settings): shown without a traceback."""


# OSErrors that are about the machine, not the program: one line, exit 2.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(); input errors end it with one clear line and exit code 2."""
    try:
        main(sys.argv[1:])
    except (ConfigError, DataError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            traceback.print_exc()
            sys.exit(1)
        # A full disk or a read-only place: the cause is outside the program. Every
        # file is written under a temporary name first, so nothing existing was harmed.
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or os.strerror(e.errno)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
