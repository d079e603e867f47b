"""Scratch folders kept per process: what a process that is gone left behind is removed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def own_folder(folder: Path) -> Path:
    """This process's folder under ``folder`` (named by its process id)."""
    return Path(folder) / str(os.getpid())


def fresh_own_folder(folder: Path) -> Path:
    """This process's folder under ``folder``, once what gone processes left there is removed."""
    clear_gone_processes(folder)
    return own_folder(folder)


def clear_gone_processes(folder: Path) -> None:
    """Remove what processes no longer running left in ``folder`` (one folder per process id: a
    restarted service, or a container whose scratch volume outlived it, would otherwise keep its
    files each time). This process's own id counts as gone: a container restarts under the same one.
    Only folders named by a process id are touched: anything else there is not ours."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.isdigit():
            continue
        if int(entry.name) != os.getpid() and _running(int(entry.name)):
            continue  # another process on this machine, sharing the folder
        shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: digits, but no process id
        return False
    except PermissionError:
        return True  # someone else's process
    return True
