"""The shipped SmolLM2 GGUF is converted once into a cached safetensors folder, also when several runs
start at once (each converts into its own temporary folder; the first to finish is kept)."""

import os
import subprocess
import sys

from zoft.session import resolve_alias

CONVERT = "import sys; from zoft.loading import gguf_to_folder; print(gguf_to_folder(sys.argv[1]))"


def test_two_runs_converting_at_once_both_get_the_cached_folder(tmp_path):
    gguf = resolve_alias("smollm2-135m-instruct")  # installed by scripts/setup.sh
    env = os.environ | {"ZOFT_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, gguf], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "converting" in err  # both really converted: the race was real
    folders = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(folders) == 1
    folder = folders.pop()
    assert sorted(os.listdir(os.path.dirname(folder))) == [os.path.basename(folder)]  # no temporary folders left
    assert {"config.json", "model.safetensors"} <= set(os.listdir(folder))

    # a later start finds it and does not convert again
    p = subprocess.run([sys.executable, "-c", CONVERT, gguf], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == folder and "converting" not in p.stderr
