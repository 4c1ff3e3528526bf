"""Offline copies of SQuAD v1.1 dev, DROP and MultiRC, taken from the BIG-bench 1.0.0 source archive on PyPI.

For machines that reach PyPI but not the Hugging Face hub. `fetch_bigbench()` downloads the archive once (358 MB,
only when asked: `zoft tasks --fetch-bigbench`), keeps the three files below and deletes the archive:

    <cache>/squad_shifts/squaddev_v1.1.json                                  SQuAD v1.1 dev, SQuAD's JSON format
    <cache>/natural_instructions/subtask028_drop_answer_generation/task.json     DROP, as Natural Instructions
    <cache>/natural_instructions/subtask058_multirc_question_answering/task.json MultiRC, as Natural Instructions

<cache> is $ZOFT_CACHE/bigbench, default ~/.cache/zoft/bigbench. A task loads from there when `datasets` is not
importable; `--data-dir <cache>` picks it explicitly. These are evaluation sets (one pool, no train split), so the
tasks then use `single_pool` and carve train/dev/test out of it. They carry BIG-bench's canary string.

`pip download --no-deps --no-binary :all: bigbench==1.0.0` fails since pip checks the sdist's metadata, which
declares a direct-URL dependency (bleurt) that pip refuses for PyPI packages; so we fetch the same file pip would
(URL and sha256 from PyPI's simple index) with urllib and check its hash.
"""

import ast
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from zoft.errors import ZoftError
from zoft.logs import log

SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SDIST_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"  # where the files below sit inside the archive

FILES = {  # zoft task name -> path under benchmark_tasks/ (and under the cache)
    "squad": "squad_shifts/squaddev_v1.1.json",
    "drop": "natural_instructions/subtask028_drop_answer_generation/task.json",
    "multirc": "natural_instructions/subtask058_multirc_question_answering/task.json",
}


def cache_root() -> Path:
    """$ZOFT_CACHE/bigbench, default ~/.cache/zoft/bigbench."""
    base = os.environ.get("ZOFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "zoft")
    return Path(base) / "bigbench"


def task_file(task: str, root: Path | None = None) -> Path | None:
    """The cached file of `task` under `root` (default: the cache), or None if it is not there."""
    path = (root if root is not None else cache_root()) / FILES[task]
    return path if path.is_file() else None


def fetch_bigbench(
    cache_dir: str | None = None, archive: str | None = None, sha256: str | None = SDIST_SHA256
) -> Path:
    """Download the BIG-bench 1.0.0 sdist (or use `archive`), extract FILES into the cache; returns the cache.

    Does nothing if every file is already there. `sha256=None` skips the hash check (tests, local archives).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    if all((root / rel).is_file() for rel in FILES.values()):
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:  # same disk: the archive is large
        path = Path(archive) if archive is not None else Path(tmp) / "bigbench-1.0.0.tar.gz"
        if archive is None:
            _download(SDIST_URL, path)
        elif not path.is_file():
            raise ZoftError(f"--archive {archive}: no such file; pass the path of bigbench-1.0.0.tar.gz")
        if sha256 is not None and _sha256(path) != sha256:
            raise ZoftError(
                f"{path}: sha256 differs from bigbench-1.0.0.tar.gz's ({sha256}); delete it, retry"
            )
        _extract(path, root)
    return root


def _download(url: str, dest: Path) -> None:
    log(f"zoft: downloading {url} (358 MB, once) ...")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:  # HTTPError, URLError, timeouts, disk full
        if isinstance(e, urllib.error.HTTPError) and e.code in (403, 404, 410):  # since 2026-12: PyPI lists only 0.0.1
            raise ZoftError(
                f"{url} is no longer served (HTTP {e.code}: PyPI dropped bigbench 1.0.0's files); if you have a "
                "copy of bigbench-1.0.0.tar.gz (a pip cache, a mirror), run `zoft tasks --fetch-bigbench "
                "--archive PATH`; or load the tasks from the hub (pip install datasets, network)"
            ) from e
        raise ZoftError(
            f"could not download {url} ({type(e).__name__}: {e}); check the network/proxy, "
            "or download it yourself and pass archive=<path>"
        ) from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(archive: Path, root: Path) -> None:
    """Copy FILES out of the archive; each file is written to a temp name and renamed, so no half files."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for rel in FILES.values():
                try:
                    src = tar.extractfile(SDIST_PREFIX + rel)
                except KeyError as e:
                    raise ZoftError(
                        f"{archive} has no {SDIST_PREFIX + rel}; is it bigbench-1.0.0.tar.gz?"
                    ) from e
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                part = dest.with_name(dest.name + ".part")
                part.write_bytes(src.read())
                os.replace(part, dest)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ZoftError(f"cannot read {archive} ({type(e).__name__}: {e}); delete it and fetch again") from e


# ---- readers for the two Natural Instructions files; each returns (where, row) with the hub's field names ----


def _examples(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ZoftError(f"{path}: not a BIG-bench task.json ({type(e).__name__}: {e}); fetch again") from e


def _drop_target(t: str) -> list[str]:
    """One NI target -> DROP answer strings, as the hub's `answers_spans.spans` would hold them.

    NI appends "." to every target and writes dates and span lists as Python reprs:
    "3." -> ["3"]; "{'day': '', 'month': 'May', 'year': '1990'}." -> ["May 1990"]; "['a', 'b']." -> ["a", "b"].
    """
    t = t[:-1] if t.endswith(".") else t
    if t.startswith(("{", "[")):
        value = ast.literal_eval(t)
        if isinstance(value, dict):  # the hub's date format: " ".join([day, month, year]).strip()
            return [" ".join(str(value.get(k, "")) for k in ("day", "month", "year")).strip()]
        return [str(v) for v in value]
    return [t]


def drop_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows {"passage", "question", "answers"} from NI subtask028 (input: "Passage: ... \\nQuestion: ... \\nAnswer
    type: ... "). Alternative targets of one question all become gold answers."""
    rows = []
    for i, ex in enumerate(_examples(path)):
        where = f"{path} example {i}"
        head, sep, _ = ex["input"].rpartition("\nAnswer type:")
        passage, sep2, question = head.rpartition("\nQuestion:")
        if not sep or not sep2 or not passage.startswith("Passage:"):
            raise ZoftError(f"{where}: input is not 'Passage: ...\\nQuestion: ...\\nAnswer type: ...'")
        try:
            answers = [a for t in ex["target"] for a in _drop_target(t)]
        except (ValueError, SyntaxError) as e:
            raise ZoftError(f"{where}: cannot parse target {ex['target']!r:.80}") from e
        rows.append(
            (where, {"passage": passage[len("Passage:") :].strip(), "question": question, "answers": answers})
        )
    return rows


def multirc_rows(path: Path) -> list[tuple[str, dict]]:
    """One row {"paragraph", "question", "answer", "label"} per answer option of NI subtask058.

    Input: "Paragraph- Sent 1: ...Sent 2: ... \\nQuestion: <q> (A) <opt> (B) <opt>." (NI appends the final "."),
    target: "A, C." = the correct options. NI dropped SuperGLUE's "<b>Sent 1: </b>...<br>" markup, which MeZO's
    prompts (from the hub) keep: paragraphs from here read "Sent 1: ...Sent 2: ...".
    """
    rows = []
    for i, ex in enumerate(_examples(path)):
        where = f"{path} example {i}"
        paragraph, sep, rest = ex["input"].rpartition("\nQuestion: ")
        if not sep or not paragraph.startswith("Paragraph- ") or " (A) " not in rest:
            raise ZoftError(f"{where}: input is not 'Paragraph- ...\\nQuestion: ... (A) ... (B) ...'")
        rest = rest[:-1] if rest.endswith(".") else rest
        question, _, options = rest.partition(" (A) ")
        texts, letter = [], "A"
        while True:  # split at " (B) ", " (C) ", ... in order, so a stray "(X)" inside an option stays put
            nxt = chr(ord(letter) + 1)
            text, sep, options = options.partition(f" ({nxt}) ")
            texts.append(text)
            if not sep:
                break
            letter = nxt
        correct = set(re.findall(r"[A-Z]", ex["target"][0]))
        for j, text in enumerate(texts):
            row = {
                "paragraph": paragraph[len("Paragraph- ") :].strip(),
                "question": question,
                "answer": text,
                "label": int(chr(ord("A") + j) in correct),
            }
            rows.append((f"{where} option {chr(ord('A') + j)}", row))
    return rows


if __name__ == "__main__":  # python -m zoft.tasks.bigbench [cache_dir [archive]]
    print(fetch_bigbench(*sys.argv[1:3]))
