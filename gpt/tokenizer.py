"""GPT-2's byte-pair encoding, built offline from the ranks file shipped in gpt/assets."""
import functools
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
# tiktoken's expected hash of r50k_base (= GPT-2's ranks): a corrupt or swapped file fails loudly.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """The same encoder as tiktoken.get_encoding("gpt2"), with no download."""
    ranks = load_tiktoken_bpe(str(RANKS), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})
