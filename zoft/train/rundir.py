"""Run folders: zoft writes only into folders it owns, one process at a time, and every file is whole.

A run folder is zoft's when it holds zoft_config.json (or, from older runs, a config.json holding zoft's
sections). A new run goes into a missing or empty folder; an existing run is continued with --resume or
replaced with --overwrite-output-dir, which removes only the files zoft writes. Anything else (a model
folder, someone's data) is refused before a byte is written. While a process writes a run it holds an
advisory lock (RUN/zoft.lock, holding its pid and host); the kernel drops the lock when the process dies,
so a lock left by a killed run is taken over, not obeyed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import time

from zoft.errors import ZoftError

CONFIG = "zoft_config.json"  # not config.json: that name is a Hugging Face model's
LEGACY_CONFIG = "config.json"
LOCK = "zoft.lock"
SPLITS = "splits.json"
FILES = {CONFIG, SPLITS, "steps.jsonl", "metrics.jsonl", "results.json", "test_predictions.jsonl", LOCK}
FOLDERS = {"checkpoint", "best", "adapter"}  # each with .tmp / .old siblings while it is being replaced


# ---- whole files -------------------------------------------------------------------------------------


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a no-op where directories can't be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path: str, data: str | bytes) -> None:
    """Write `data` beside `path`, fsync it, then rename it over `path`: readers see the old or the new file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_json(path: str, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2))


# ---- what a folder is --------------------------------------------------------------------------------


def is_run_config(d: object) -> bool:
    return isinstance(d, dict) and {"model", "task", "zo", "run"} <= d.keys()


def read_run_config(run_dir: str) -> dict | None:
    """The run's resolved config (zoft_config.json, or an older run's config.json); None if there is none."""
    for name in (CONFIG, LEGACY_CONFIG):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, ValueError):
                d = None
            if is_run_config(d):
                return d
    return None


def _log_header(run_dir: str) -> bool:
    path = os.path.join(run_dir, "steps.jsonl")
    try:
        with open(path) as f:
            return '"header"' in f.readline()
    except OSError:
        return False


def is_run(folder: str) -> bool:
    """A folder zoft wrote: its config, or a step log / checkpoint left before the config was written."""
    return (read_run_config(folder) is not None or _log_header(folder)
            or os.path.isfile(os.path.join(folder, "checkpoint", "state.json")))


def entries(folder: str) -> list[str]:
    """The folder's entries, ignoring zoft's own lock file."""
    return sorted(n for n in os.listdir(folder) if n != LOCK)


def owned(name: str) -> bool:
    """Whether zoft writes an entry of this name into a run folder (write_atomic's and the swaps' temporaries too)."""
    stem, _, suffix = name.partition(".tmp-")
    if stem in FILES:
        return True
    stem, _, suffix = name.partition(".")
    numbered = stem.startswith("checkpoint-") and stem[len("checkpoint-"):].isdigit()  # --save-total-limit's
    return (stem in FOLDERS or numbered) and suffix in ("", "tmp", "old")


def has_progress(run_dir: str) -> bool:
    """Whether a run folder holds trained steps: a checkpoint (in any state of its swap) or logged updates."""
    if any(os.path.isdir(os.path.join(run_dir, "checkpoint" + s)) for s in ("", ".old", ".tmp")):
        return True
    path = os.path.join(run_dir, "steps.jsonl")
    if not os.path.isfile(path):
        return False
    with open(path, errors="replace") as f:
        return any('"grads"' in line for line in f)


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_dir(out: str, *, resume: bool, overwrite: bool, model: str = "", flag: str = "--output-dir") -> str:
    """Read-only checks before a run writes into `out`; returns "new", "resume" or "overwrite".

    Refuses a file, the model's own folder, and any non-empty folder that is not a zoft run."""
    if not out:
        raise ZoftError(f"{flag} is empty; name the folder the run should write")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ZoftError(f"{flag} {out} is a file, not a folder; choose a folder for the run")
    if model and os.path.isdir(model) and _same_path(out, model):
        raise ZoftError(f"{flag} {out} is the model's own folder; zoft would overwrite the model's files there: "
                        "choose another folder")
    if not os.path.isdir(out) or not entries(out):
        if resume:
            raise ZoftError(f"--resume: {out} holds no run to continue; start it without --resume")
        return "new"
    if not is_run(out):
        shown = ", ".join(entries(out)[:4]) + (", …" if len(entries(out)) > 4 else "")
        raise ZoftError(f"{flag} {out} is not empty ({shown}) and is not a zoft run folder; zoft writes only into "
                        "a new or empty folder or its own runs: choose another folder")
    if resume:
        return "resume"
    if overwrite:
        return "overwrite"
    if not has_progress(out):  # a start that never reached its first checkpoint: nothing to lose
        return "overwrite"
    raise ZoftError(f"{out} already holds a zoft run; pass --resume to continue it, --overwrite-output-dir to "
                    "replace it, or choose another --output-dir")


def clear_run(out: str) -> list[str]:
    """Remove zoft's own files from a run folder (never anything else, never the lock); returns their names."""
    gone = []
    for name in entries(out):
        if not owned(name) and not (name == LEGACY_CONFIG and read_run_config(out) is not None):
            continue
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        gone.append(name)
    return gone


# ---- one writer at a time ------------------------------------------------------------------------------


class RunLock:
    """An advisory lock on a run folder: fcntl.flock on RUN/zoft.lock, which holds {"pid", "host", "since"}.

    The kernel releases a flock when its holder dies, so a lock file left by a SIGKILL is stale by
    construction: the next writer gets the lock and says whose it was. A live holder makes acquire()
    raise a ZoftError naming it. Creates the folder; release() removes the folder again when nothing
    but the lock ended up in it (a failed start leaves no empty run folder behind)."""

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, LOCK)
        self.fd: int | None = None
        self.created = False
        self.stale: dict | None = None

    def acquire(self) -> RunLock:
        if not os.path.isdir(self.folder):
            try:
                os.makedirs(self.folder)
                self.created = True
            except FileExistsError:
                pass
            except OSError as e:
                raise ZoftError(f"cannot create the run folder {self.folder}: {e.strerror}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ZoftError(f"cannot write in the run folder {self.folder} ({e.strerror}); check its "
                                "permissions or choose another --output-dir") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_lock(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise ZoftError(f"{self.folder} is in use by another zoft process (pid {holder.get('pid', '?')} on "
                                f"{holder.get('host', '?')}, since {since}); wait for it to finish or stop it, or "
                                "choose another --output-dir") from None
            try:  # its last holder may have unlinked the file between our open and our lock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_lock(fd)
        if old.get("pid") not in (None, os.getpid()) or old.get("host") not in (None, socket.gethostname()):
            self.stale = old  # its holder died without releasing it (SIGKILL, power loss)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode (see acquire)
        os.close(self.fd)
        self.fd = None
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only succeeds if the folder is empty

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock(fd: int) -> dict:
    try:
        d = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


# ---- writing a folder elsewhere (export, replay) --------------------------------------------------------


def check_target(out: str, *, overwrite: bool, marker: str, what: str, model: str = "", run: str = "") -> None:
    """Read-only: `out` may be written by export/replay. New or empty, or (with --overwrite-output-dir) an
    earlier output of the same command, recognised by its `marker` file; never the model's or the run's folder."""
    for other, name in ((model, "the model's own folder"), (run, "the run folder itself")):
        if other and os.path.isdir(other) and os.path.isdir(out) and _same_path(out, other):
            raise ZoftError(f"--output-dir {out} is {name}; {what} writes a new folder: choose another")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ZoftError(f"--output-dir {out} is a file, not a folder; choose a new folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    if not os.path.isfile(os.path.join(out, marker)):
        raise ZoftError(f"--output-dir {out} is not empty and was not written by zoft {what}; choose a new or "
                        "empty folder")
    if not overwrite:
        raise ZoftError(f"--output-dir {out} holds an earlier zoft {what}; pass --overwrite-output-dir to "
                        "replace it, or choose another folder")


def staging(out: str) -> str:
    """A fresh temporary folder beside `out` (same filesystem, so publish() is a rename). Folders left there
    by a killed export or replay (their process is gone) are removed first."""
    out = os.path.normpath(out)
    for left in glob.glob(glob.escape(out) + ".tmp-*") + glob.glob(glob.escape(out) + ".old-*"):
        pid = left.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: str, out: str) -> None:
    """Put the finished folder `tmp` in place of `out` (missing, empty, or an earlier output) by renames."""
    out = os.path.normpath(out)
    old = None
    if os.path.isdir(out) and os.listdir(out):
        old = f"{out}.old-{os.getpid()}"
        os.replace(out, old)
    elif os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ---- what --resume may change ------------------------------------------------------------------------------

# Fields that change nothing a step computes: they may differ on --resume. Every other field, including
# ones added later, must match the run's. (The data itself is compared through the splits' hashes.)
HARMLESS = {
    "run": {"output_dir", "resume", "overwrite_output_dir", "eval_every", "save_every", "eval_batch_size",
            "log_every", "fsync_every", "zero_shot", "cuda_graphs", "pipeline", "cache_mb", "guard_strikes",
            "save_total_limit"},
    "model": {"device"},  # its type is compared once resolved (z depends on it), cuda:0 vs cuda:1 may differ
    "task": {"data_dir"},
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_differences(saved: dict, cfg, allow: set[str] = frozenset()) -> list[str]:
    """'--flag RUN_VALUE → NEW_VALUE' for every trajectory-changing difference between the run's config
    (its zoft_config.json) and `cfg` (a TrainConfig); `allow` holds "section.field" names that may change."""
    import dataclasses

    from zoft.config import TrainConfig

    new = cfg.to_dict()
    old_cfg = TrainConfig.from_dict({k: {f: v for f, v in saved.get(k, {}).items()
                                         if f in {x.name for x in dataclasses.fields(type(getattr(cfg, k)))}}
                                     for k in ("model", "task", "zo", "run")})
    old = old_cfg.to_dict()  # fields the run predates take their defaults
    effective = {("zo", "eps"): (old_cfg.zo.eps_value, cfg.zo.eps_value),
                 ("zo", "lr"): (old_cfg.zo.lr_value, cfg.zo.lr_value)}
    diffs = []
    for section in ("model", "task", "zo", "run"):
        for name, value in new[section].items():
            was = old[section].get(name)
            if name in HARMLESS.get(section, ()) or f"{section}.{name}" in allow:
                continue
            if (section, name) in effective:
                was, value = effective[(section, name)]
            if section == "run" and name == "steps" and cfg.zo.schedule == "constant":
                continue  # a constant rate doesn't depend on the total: a run may be extended
            if section == "task" and name == "task" and os.path.isfile(str(value)) and os.path.isfile(str(was)):
                continue  # a data file may move; its content is compared through the splits' hashes
            if section == "model" and name == "model" and (_same_model(str(was), str(value))
                                                           or saved.get("resolved", {}).get("model_fingerprint")):
                continue  # the same path, or checked once loaded: the weights' fingerprint against the run's
            if was != value:
                diffs.append(f"{_flag(name)} {was!r} → {value!r}")
    return diffs


def _same_model(a: str, b: str) -> bool:
    return a == b or (os.path.exists(a) and os.path.exists(b) and _same_path(a, b))
