"""GPT-2's byte-pair encoding, built offline from the ranks file shipped in gpt/assets."""
import base64
import functools
import hashlib
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
# tiktoken's expected hash of r50k_base (= GPT-2's ranks): a corrupt or swapped file fails loudly.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = 50256  # <|endoftext|>


@functools.cache
def gpt2() -> tiktoken.Encoding:
    """The same encoder as tiktoken.get_encoding("gpt2"), with no download. The ranks file is
    read here, not by tiktoken's load_tiktoken_bpe, which copies even a local file into its cache
    directory first (and so fails where that is read-only)."""
    data = RANKS.read_bytes()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise ValueError(f"{RANKS} is not GPT-2's ranks file (its sha256 differs): restore it from the repository")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})
