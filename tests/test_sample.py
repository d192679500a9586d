"""gpt.sample's arguments and edge cases, on tiny checkpoints written here (training's own
sampling is in test_train.py)."""
import weakref
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import kernels
from bench import profile
from gpt import checkpoint
from gpt.model import GPT, GPTConfig
from gpt.sample import main as sample
from kernels import choose
from tests.devices import cuda_only

CHARS = "ab \n"
FIXTURE = Path(__file__).parent / "fixtures" / "hf_gpt2_tiny"  # a 96-token GPT-2


def char_checkpoint(out: Path, dtype=torch.float32, dropout=0.0) -> list[str]:
    """A character-level checkpoint whose model's vocabulary (64) is padded past its 4
    characters, as train.py's would be after fine-tuning a larger model; the args to sample it."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, dropout=dropout)
    meta = dict(vocab_size=len(CHARS), stoi={ch: i for i, ch in enumerate(CHARS)}, itos=dict(enumerate(CHARS)))
    checkpoint.save(dict(model=GPT(config).to(dtype).state_dict(), model_args=asdict(config), meta=meta), out)
    return [f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--start=ab"]


def test_only_decodable_tokens_are_sampled(tmp_path):
    args = char_checkpoint(tmp_path)
    text = sample([*args, "--max_new_tokens=40", "--temperature=100", "--top_k=None"])[0]
    assert len(text) == 42 and set(text) <= set(CHARS)


def test_temperature_zero_takes_the_likeliest_token(tmp_path):
    args = char_checkpoint(tmp_path)
    greedy = [sample([*args, "--temperature=0", f"--seed={s}", "--max_new_tokens=20"]) for s in (1, 2)]
    # No inf - inf, nor 0 / 0 at temperatures that are 0 in float32: the same argmax.
    tiny = [sample([*args, f"--temperature={t}", "--max_new_tokens=20"]) for t in (1e-45, 1e-46, 1e-300)]
    assert greedy[0] == greedy[1] == tiny[0] == tiny[1] == tiny[2]


def test_triton_kernels_fall_back_per_op_at_the_model_s_own_shapes(tmp_path):
    """kernels=triton self-checks the ops at the checkpoint's shapes: its head size (8) is not
    one Triton's attention takes, so attention falls back to torch, with a warning, and the
    sample is the torch one."""
    args = [*char_checkpoint(tmp_path), "--temperature=0", "--max_new_tokens=4"]
    with pytest.warns(UserWarning, match="kernels=triton: attention falls back to torch"):
        triton = sample([*args, "--kernels=triton"])
    assert triton == sample(args)


def loads_on_the_host_and_lets_go(tmp_path, monkeypatch, device: str) -> None:
    """Of a training checkpoint (weights and optimizer state) only the model's copy of the weights
    lives through generation, on a GPU the only copy there."""
    args, load, kept = [*char_checkpoint(tmp_path), f"--device={device}"], checkpoint.load, []

    def spy_load(out_dir, device):
        ckpt = load(out_dir, device)
        kept.append((device, weakref.ref(next(iter(ckpt["model"].values())))))
        return ckpt
    monkeypatch.setattr(checkpoint, "load", spy_load)
    generate, alive = GPT.generate, []
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **k: alive.append(kept[0][1]() is not None)
                        or generate(self, *a, **k))
    sample([*args, "--max_new_tokens=2"])
    assert kept[0][0] == "cpu" and alive == [False]


def test_the_checkpoint_is_let_go_before_generation(tmp_path, monkeypatch):
    loads_on_the_host_and_lets_go(tmp_path, monkeypatch, "cpu")


@cuda_only
def test_the_checkpoint_is_read_on_the_host_not_the_gpu(tmp_path, monkeypatch):
    loads_on_the_host_and_lets_go(tmp_path, monkeypatch, "cuda")


def test_kernels_are_chosen_for_generation(tmp_path, monkeypatch):
    """Sampling runs forward only: kernels.choose is told so (profiles' forward timings count)."""
    asked = []
    monkeypatch.setattr(kernels, "choose", lambda *args, **kw: asked.append(kw) or choose(*args, **kw))
    sample([*char_checkpoint(tmp_path), "--max_new_tokens=1"])
    assert [kw["generation"] for kw in asked] == [True]


def test_the_seed_decides_the_sample_whatever_the_kernels(tmp_path, monkeypatch):
    """kernels=triton's self-check draws its inputs and seeds its dropout (a checkpoint trained
    with dropout) in a random state of its own: after it, the seed still decides the sample, and
    the same one as with torch's kernels (it gave one text for every seed)."""
    monkeypatch.setattr(profile, "_checked", {})  # the check runs here, not in an earlier test
    args = [*char_checkpoint(tmp_path, dropout=0.2), "--temperature=1.0", "--max_new_tokens=20"]
    with pytest.warns(UserWarning, match="kernels=triton: attention falls back to torch"):
        triton = [sample([*args, "--kernels=triton", f"--seed={seed}"]) for seed in (1, 2)]
    assert triton[0] != triton[1]
    assert triton[0] == sample([*args, "--seed=1"])


def test_a_bf16_checkpoint_samples_in_the_dtype_asked_for(tmp_path, monkeypatch):
    args = char_checkpoint(tmp_path, torch.bfloat16)
    seen = []
    generate = GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **k: seen.append(self.lm_head.weight.dtype) or generate(self, *a, **k))
    sample([*args, "--dtype=float32", "--max_new_tokens=2"])
    sample([*args, "--dtype=bfloat16", "--max_new_tokens=2"])
    assert seen == [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("arg, message", [
    ("--start=abc", r"characters the checkpoint's vocabulary lacks: \['c'\]"),
    ("--start=", "the prompt is empty"),
    ("--start=FILE:/nonexistent/prompt.txt", "start: .*No such file"),
    ("--temperature=-1.0", "temperature must be >= 0"),
    ("--top_k=0", "top_k must be at least 1, or None"),
    ("--dtype=bf16", "dtype must be float32, bfloat16 or float16, got 'bf16'"),
    ("--device=5", "device must be str or None, got 5"),  # (a traceback once)
    # devices this machine lacks or torch.load cannot map to (a "corrupt checkpoint" once)
    ("--device=cpu:0", "device 'cpu:0': the CPU is 'cpu'"),
    ("--device=meta", "device 'meta': a model trains and samples on cpu, cuda or mps"),
    ("--device=mps", r"device 'mps': this machine has 0 mps device\(s\)"),
])
def test_bad_arguments_stop_with_the_reason(tmp_path, arg, message):
    args = char_checkpoint(tmp_path)
    with pytest.raises(SystemExit, match=f"^gpt.sample: .*{message}"):
        sample([*args, "--max_new_tokens=2", arg])


def test_a_missing_checkpoint_or_gpu_and_a_prompt_past_the_vocabulary_stop_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="gpt.sample: .*no checkpoint"):
        sample([f"--out_dir={tmp_path / 'nothing'}", "--device=cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="gpt.sample: device=cuda, but torch sees no CUDA GPU"):
            sample([*char_checkpoint(tmp_path), "--device=cuda"])
    with pytest.raises(SystemExit, match="gpt.sample: start: the prompt's token .* past the model's 96-token"):
        sample([f"--init_from={FIXTURE}", "--device=cpu", "--start=Hello"])
    # An empty prompt starts a GPT-2 BPE model (here train.py's from scratch) from <|endoftext|>.
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)  # 50304 tokens
    (tmp_path / "bpe").mkdir()
    checkpoint.save(dict(model=GPT(config).state_dict(), model_args=asdict(config)), tmp_path / "bpe")
    text = sample([f"--out_dir={tmp_path / 'bpe'}", "--device=cpu", "--start=", "--num_samples=1", "--max_new_tokens=3"])
    assert text[0].startswith("<|endoftext|>")


def test_no_training_key_is_close_enough_to_a_sampling_key_to_be_refused():
    """gpt.sample refuses a file's key close to one of its own as a misspelling: train.py's own
    keys (those it does not share) must never be, or its config files would not sample."""
    import difflib

    import train
    from gpt.config import MISSPELT
    from gpt.sample import DEFAULTS
    for key in set(train.DEFAULTS) - set(DEFAULTS):
        assert not difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=MISSPELT), key


def test_a_training_config_file_gives_its_out_dir(tmp_path):
    """As nanoGPT's sample.py runs one: the keys sampling has (out_dir, device) taken, training's
    passed over; a --key=value sampling lacks is still an error."""
    char_checkpoint(tmp_path)
    config = tmp_path / "train_config.py"
    # Its init_from is where training started (a fine-tuning's GPT-2), not what it wrote: passed over.
    config.write_text(f"out_dir = {str(tmp_path)!r}\ndevice = 'cpu'\nbatch_size = 64\nlearning_rate = 1e-3\n"
                      "init_from = 'gpt2-xl'\n")
    texts = sample([str(config), "--num_samples=1", "--start=ab", "--max_new_tokens=3"])
    assert len(texts) == 1 and len(texts[0]) == 5
    with pytest.raises(SystemExit, match="gpt.sample: --batch_size=2: unknown config key 'batch_size'"):
        sample([str(config), "--batch_size=2"])
    # A sampling key misspelt in a file is not one of training's to pass over (was sampled at the
    # default temperature without a word).
    typo = tmp_path / "sample_config.py"
    typo.write_text(f"out_dir = {str(tmp_path)!r}\nlearning_rate = 1e-3\ntemprature = 0.0\n")
    with pytest.raises(SystemExit, match=r"sample_config.py:3: unknown config key 'temprature' "
                                         r"\(did you mean 'temperature'\?\)"):
        sample([str(typo)])
