"""Files a run reads and the folders it writes: every way they can be damaged or unwritable ends as one
ZoftError line that names the file and what to do, never a traceback.

Two kinds of failure meet here. Damaged inputs (a truncated safetensors file, a config that is not JSON, a
checkpoint's state.json missing a key) are found where they are read. Environment failures while writing
(disk full, a read-only folder) surface as OSError anywhere, or as a SafetensorError wrapping one from the
Rust writer; `os_error_of` recognises both so that the CLI can report them in one place.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re

import torch

from zoft.errors import ZoftError

# errno values that mean "the environment refused", not "zoft has a bug": the CLI reports these on one line
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                      errno.ENAMETOOLONG}


def read_json(path: str, what: str, fix: str) -> dict:
    """A JSON object from `path`; missing, unreadable, malformed or not an object is a ZoftError
    "`what` PATH ...: `fix`"."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ZoftError(f"{what} {path} is missing; {fix}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise ZoftError(f"{what} {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise ZoftError(f"{what} {path} holds a JSON {type(d).__name__}, not an object; {fix}")
    return d


def load_tensors(path: str, fix: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; an empty, truncated or garbage file is a ZoftError ending in `fix`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise ZoftError(f"{path} is missing; {fix}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ZoftError(f"{path} is not a readable safetensors file ({e}); {fix}") from None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_fix(path: str) -> str:
    """What to do about a damaged checkpoint at `path` (RUN/checkpoint): rebuild it from the step log."""
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "steps.jsonl")
    return (f"the checkpoint is damaged; zoft replay --model MODEL --log {log} --output-dir NEW_FOLDER rebuilds the "
            "trained parameters from the step log")


def read_checkpoint(path: str, need: tuple[str, ...] = (), verify: bool = True) -> dict:
    """A checkpoint's state.json, checked: a ZoftError if it is missing, malformed or lacks a key in `need`,
    or (verify) if a file it lists is missing or not the one saved (its sha256 differs)."""
    fix = checkpoint_fix(path)
    state = read_json(os.path.join(path, "state.json"), "checkpoint state", fix)
    for k in need:
        if not (isinstance(state.get(k), int) and state[k] >= 0):
            raise ZoftError(f"checkpoint state {path}/state.json has no valid {k!r} ({state.get(k)!r}); {fix}")
    for name, digest in state.get("sha256", {}).items() if verify else ():
        f = os.path.join(path, name)
        if not os.path.isfile(f) or sha256(f) != digest:
            raise ZoftError(f"{f} is {'missing' if not os.path.isfile(f) else 'not the file that was saved (checksum)'}; {fix}")
    return state


def check_output_dir(path: str, flag: str = "--output-dir") -> None:
    """Refuse, before any work, a folder zoft could never write: empty, a file, under a file, read-only.
    (Whether zoft may write into an existing folder is the run folder's own check.)"""
    if not path:
        raise ZoftError(f"{flag} is empty; pass a folder")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ZoftError(f"{flag} {path} is a file, not a folder; pass a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ZoftError(f"{flag} {path}: {parent} is a file, not a folder; pass a path under a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ZoftError(f"{flag} {path}: {parent} is not writable; pass a folder you can write to")


def check_output_file(path: str, flag: str) -> None:
    """The folder a single output file goes into must exist (zoft makes run folders, not arbitrary paths)."""
    if not path or path.endswith(os.sep):
        raise ZoftError(f"{flag} {path!r} is not a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ZoftError(f"{flag} {path}: folder {parent} does not exist; create it first or pass another path")
    if os.path.isdir(path):
        raise ZoftError(f"{flag} {path} is a folder; pass a file name")


def os_error_of(e: BaseException) -> OSError | None:
    """The environment's refusal inside `e`, if that is what it is: an OSError with one of ENVIRONMENT_ERRNOS,
    or the safetensors writer's error that wraps one ("I/O error: No space left on device (os error 28)")."""
    if isinstance(e, OSError):
        return e if e.errno in ENVIRONMENT_ERRNOS else None
    if type(e).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(e))
        if m and int(m.group(1)) in ENVIRONMENT_ERRNOS:
            n = int(m.group(1))
            return OSError(n, os.strerror(n))
    return None


ADVICE = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
          errno.EFBIG: "free some space or raise the file size limit (ulimit -f)", errno.EIO: "check the disk",
          errno.ENAMETOOLONG: "use a shorter path"}


def describe_os_error(e: OSError) -> str:
    """"No space left on device (ENOSPC): PATH; free some space", for the CLI's one line."""
    where = f": {e.filename}" if e.filename else ""
    name = errno.errorcode.get(e.errno, str(e.errno))
    return f"{e.strerror} ({name}){where}; {ADVICE.get(e.errno, 'fix the permissions or pick another folder')}"
