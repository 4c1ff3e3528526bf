"""Native models against transformers' own implementations on tiny random checkpoints (float32)."""

import pytest
import torch
import transformers

from tests.tiny import make_tiny
from zoft.engine.packing import build_batch
from zoft.loading import build_native, read_config
from zoft.tasks.encode import Encoded


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("kind", ["opt", "opt350", "llama", "qwen2"])
def test_logits_match_transformers(root, kind):
    folder = make_tiny(kind, root)
    ours = build_native(folder, read_config(folder), torch.float32, "cpu").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 50000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids)
        b = ref(ids).logits
    rel = ((a - b).abs().max() / b.abs().max()).item()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_packed_shared_prompt_equals_separate_sequences(root, kind):
    """Candidate log-probs from one packed segment equal those of each prompt+candidate encoded alone."""
    folder = make_tiny(kind, root)
    model = build_native(folder, read_config(folder), torch.float32, "cpu").eval()
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, 50000, (n,), generator=g).tolist()
    exs = [Encoded(rnd(5), [rnd(1), rnd(3)], 1, "mc"), Encoded(rnd(9), [rnd(2), rnd(1), rnd(4)], 0, "mc")]
    b = build_batch(exs, "cpu", pack_tokens=64)
    assert b.packs.ids.shape[0] == 1  # both examples in one pack row
    from zoft.engine.native import NativeEngine

    got = NativeEngine(model).scores(b).cand_sum[0]
    want = []
    with torch.no_grad():
        for e in exs:
            for c in e.cand_ids:
                ids = torch.tensor([e.prompt_ids + c])
                lp = model(ids)[0].log_softmax(-1)
                n = len(e.prompt_ids)
                want.append(sum(lp[n - 1 + t, c[t]].item() for t in range(len(c))))
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_kv_cache_greedy_decoding_matches_transformers_generate(root, kind):
    folder = make_tiny(kind, root)
    ours = build_native(folder, read_config(folder), torch.float32, "cpu").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.randint(3, 50000, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    got = ours.generate(prompt, max_new=10, stop=set(), rows=2)
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10,
                        pad_token_id=0)[0, len(prompt):].tolist()
    assert got[0] == want and got[1] == want
    first = want[3]
    assert ours.generate(prompt, 10, stop={first})[0] == want[: want.index(first)]


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_batched_generation_matches_one_prompt_at_a_time(root, kind):
    """Left-padded batched decoding gives each prompt the tokens it gets alone (positions and padding
    masks right), including a row that stops early while the others go on."""
    folder = make_tiny(kind, root)
    ours = build_native(folder, read_config(folder), torch.float32, "cpu").eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 50000, (n,), generator=g).tolist() for n in (5, 17, 9, 1)]
    alone = [ours.generate(p, 8, set())[0] for p in prompts]
    assert ours.generate_batch(prompts, 8, set()) == alone
    stop = {alone[1][2]}
    want = [ours.generate(p, 8, stop)[0] for p in prompts]
    assert len(want[1]) < 8 and ours.generate_batch(prompts, 8, stop) == want
