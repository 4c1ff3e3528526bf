"""bench/dp_bench.py on two CPU processes (gloo, tiny shapes): strong and weak scaling, full mode, directions
spread over the ranks, and the summary that pairs each run with the one-process run doing the same work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_distributed import ENV, torchrun

pytestmark = pytest.mark.distributed
BENCH = Path(__file__).resolve().parent.parent / "bench" / "dp_bench.py"
TINY = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--steps", "2", "--warmup", "1"]


def test_scaling_runs_and_their_baselines(tmp_path):
    out = tmp_path / "dp.jsonl"
    runs = [(1, ["--directions", "2", "--global-batch", "8"]),  # the baseline of the spread run
            (2, ["--spread-directions", "--global-batch", "8"]),  # 1 direction a rank, 2 in all
            (1, ["--per-rank-batch", "4", "--mode", "full"]), (2, ["--per-rank-batch", "4", "--mode", "full"]),
            (2, ["--global-batch", "8"])]  # strong scaling with no one-process run: no speed-up to give
    for n, args in runs:
        p = torchrun(BENCH, *TINY, *args, "--json-out", out, nproc=n, env={"PYTHONPATH": str(BENCH.parent.parent)})
        assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    spread, weak2 = rows[1], rows[3]
    assert (spread["scaling"], spread["directions"], spread["world_size"], spread["per_rank_batch"]) == ("spread", 2, 2, 8)
    assert spread["step_ms_pipelined"] is None  # zoft train runs spread directions synchronously
    assert (weak2["scaling"], weak2["mode"], weak2["global_batch"], weak2["per_rank_batch"]) == ("weak", "full", 8, 4)
    assert rows[2]["global_batch"] == 4 and rows[0]["directions"] == 2

    p = subprocess.run([sys.executable, str(BENCH), "--summarize", str(out)], capture_output=True, text=True,
                       env=ENV | {"PYTHONPATH": str(BENCH.parent.parent)}, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])["results"]
    assert [r["speedup"] is not None for r in summary] == [True, True, True, True, False]
    assert summary[1]["speedup"] == round(rows[0]["step_ms"] / rows[1]["step_ms"], 3)  # steps/s, same work
    assert summary[3]["speedup"] == round(rows[3]["examples_per_second"] / rows[2]["examples_per_second"], 3)
