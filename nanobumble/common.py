"""What every script shares: precision, durations, friendly errors."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback
from typing import Callable

import torch

from .config import ConfigError


# OSErrors that are about the machine, not the program: one line, exit 2.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}


class UserError(Exception):
    """A problem with the user's input (data, paths, settings): shown without a traceback."""


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 autocast on CUDA, plain fp32 on CPU (where bf16 is slow)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run a script's main(); input errors end it with one clear line and exit code 2."""
    from .data import DataError  # imported here: data.py is heavier than this module

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
