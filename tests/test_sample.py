"""gpt.sample's arguments and edge cases, on tiny checkpoints written here (training's own
sampling is in test_train.py)."""
import os
import pickle
import subprocess
import sys
import weakref
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import kernels
from bench import profile
from gpt import checkpoint, model as gpt_model
from gpt.model import GPT, GPTConfig
from gpt.sample import DEFAULTS, checkpoint_meta
from gpt.sample import main as sample
from gpt.tokenizer import EOT
from kernels import choose
from tests.devices import cuda_only

CHARS = "ab \n"
FIXTURE = Path(__file__).parent / "fixtures" / "hf_gpt2_tiny"  # a 96-token GPT-2


def char_checkpoint(out: Path, dtype=torch.float32, chars: str = CHARS, **config) -> list[str]:
    """A character-level checkpoint of `chars` whose model's vocabulary (64, or config's
    vocab_size) is padded past them, as train.py's would be after fine-tuning a larger model;
    the args to sample it. config: GPTConfig's other keys."""
    torch.manual_seed(0)
    config = GPTConfig(**dict(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64) | config)
    meta = dict(vocab_size=len(chars), stoi={ch: i for i, ch in enumerate(chars)}, itos=dict(enumerate(chars)))
    checkpoint.save(dict(model=GPT(config).to(dtype).state_dict(), model_args=asdict(config), meta=meta), out)
    return [f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--start=ab"]


def bpe_checkpoint(out: Path) -> list[str]:
    """A GPT-2 BPE checkpoint as train.py writes one from scratch (50304 ids, padded past GPT-2's
    50257); the args to sample it."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    out.mkdir(exist_ok=True)
    checkpoint.save(dict(model=GPT(config).state_dict(), model_args=asdict(config)), out)
    return [f"--out_dir={out}", "--device=cpu", "--num_samples=1"]


def without(args: list[str], *keys: str) -> list[str]:
    return [a for a in args if not a.startswith(tuple(f"--{k}=" for k in keys))]


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


def test_kernels_are_chosen_for_generation_and_its_ops(tmp_path, monkeypatch):
    """Sampling runs forward only: kernels.choose is told so (profiles' forward timings count),
    and self-checks the ops generation calls: a RoPE model turns its cached keys with the rope op
    and computes no loss (linear_cross_entropy's check would be wasted, rope's missed)."""
    asked = []
    monkeypatch.setattr(kernels, "choose", lambda *args, **kw: asked.append(kw) or choose(*args, **kw))
    sample([*char_checkpoint(tmp_path, pos_encoding="rope"), "--max_new_tokens=2"])
    assert [(kw["generation"], kw["used"]) for kw in asked] == [(True, {"layer_norm", "attention", "rope"})]


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


def generate_dtypes(monkeypatch, device_type: str) -> list:
    """Filled with what each generate call runs under: (autocast's dtype or False, the weights' dtype)."""
    seen, generate = [], GPT.generate
    monkeypatch.setattr(GPT, "generate", lambda self, *a, **k: seen.append(
        (torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type), self.lm_head.weight.dtype))
        or generate(self, *a, **k))
    return seen


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_the_dtype_asked_for(tmp_path, monkeypatch, weights):
    """fp32 weights run under autocast to the dtype asked for (on the CPU float32 by default: none);
    a pure-bf16 checkpoint's weights are made fp32 for float32, and run as they are in bf16."""
    seen = generate_dtypes(monkeypatch, "cpu")
    args = [*char_checkpoint(tmp_path, weights), "--max_new_tokens=2"]
    for dtype in ([], ["--dtype=float32"], ["--dtype=bfloat16"]):
        sample(args + dtype)
    f32, bf16 = torch.float32, torch.bfloat16
    assert seen == [(False, f32), (False, f32), (bf16, f32) if weights == f32 else (False, bf16)]


@cuda_only
def test_on_a_gpu_the_default_dtype_is_bfloat16_where_it_is_native(tmp_path, monkeypatch):
    seen = generate_dtypes(monkeypatch, "cuda")
    sample([*char_checkpoint(tmp_path), "--device=cuda", "--max_new_tokens=2"])
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert seen == [(torch.bfloat16 if native else False, torch.float32)]


def test_an_indexed_gpu_is_made_current_first(tmp_path, monkeypatch):
    """--device=cuda:1: the kernels' profile and self-checks, and is_bf16_supported, ask the
    current GPU, so cuda:1 is made it before them (they asked GPU 0 once)."""
    import gpt.sample
    made = []

    def set_device(device):
        made.append(device)
        raise InterruptedError  # (no GPU here to go on with)
    monkeypatch.setattr(gpt.sample, "check_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kw: pytest.fail("asked before cuda:1 was current"))
    with pytest.raises(InterruptedError):
        sample([*char_checkpoint(tmp_path), "--device=cuda:1"])
    assert made == ["cuda:1"]


@pytest.mark.parametrize("arg, message", [
    ("--start=abc", r"characters the checkpoint's vocabulary lacks: \['c'\]"),
    ("--start=cab", r"start: the prompt has characters the checkpoint's vocabulary lacks: \['c'\]"),
    ("--start=", "the prompt is empty"),
    ("--start=FILE:/nonexistent/prompt.txt", "start: .*No such file"),
    ("--temperature=-1.0", "temperature must be finite and >= 0"),
    ("--top_k=0", "top_k must be at least 1, or None"),
    ("--max_new_tokens=-5", "max_new_tokens must be at least 0, got -5"),  # took as 0 once
    ("--num_samples=0", "num_samples must be at least 1, got 0"),  # printed nothing once
    ("--init_from=nonsense", "init_from must be resume, .*got 'nonsense'"),
    ("--init_from=", "init_from must be resume, .*got ''$"),  # read as the working folder once (Path('') is .)
    ("--dtype=bf16", "dtype must be float32, bfloat16 or float16, got 'bf16'"),
    ("--dtype=float64", "dtype must be float32, bfloat16 or float16, got 'float64'"),  # no kernel takes it
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
    nothing = [f"--out_dir={tmp_path / 'nothing'}", "--device=cpu"]
    with pytest.raises(SystemExit, match="gpt.sample: .*no checkpoint"):
        sample(nothing)
    # Refused before a checkpoint is looked for (or a model downloaded): the setting's message.
    for arg, message in (("--kernels=trition", "kernels must be one of"),
                         ("--kernels={'softmax': 'triton'}", "kernels: unknown ops"),
                         ("--seed=-1", r"seed must be in \[0, 2\*\*63\), got -1"),
                         (f"--seed={2**64}", r"seed must be in \[0, 2\*\*63\)"),  # (a traceback once)
                         ("--start=FILE:/nonexistent/prompt.txt", "start: .*No such file")):
        with pytest.raises(SystemExit, match=f"^gpt.sample: {message}"):
            sample([*nothing, arg])
    (tmp_path / "empty").mkdir()  # a folder of GPT-2's weights, lacking them: named as the setting it is
    with pytest.raises(SystemExit, match=f"^gpt.sample: init_from={tmp_path / 'empty'}: .* lacks config.json"):
        sample([f"--init_from={tmp_path / 'empty'}", "--device=cpu"])
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:0"):
            with pytest.raises(SystemExit, match=f"gpt.sample: device '{device}': this machine has 0 cuda device"):
                sample([*char_checkpoint(tmp_path), f"--device={device}"])
    with pytest.raises(SystemExit, match="gpt.sample: start: the prompt's token .* past the model's 96-token"):
        sample([f"--init_from={FIXTURE}", "--device=cpu", "--start=Hello"])
    # An empty prompt starts a GPT-2 BPE model (here train.py's from scratch) from <|endoftext|>.
    text = sample([*bpe_checkpoint(tmp_path / "bpe"), "--start=", "--max_new_tokens=3"])
    assert text[0].startswith("<|endoftext|>")


def test_a_model_without_gpt2s_end_of_text_token_is_not_read_as_bpe(tmp_path):
    """GPT-2's BPE ids run to its end-of-text token, 50256: a model with fewer ids than 50257 and
    no character vocabulary is not one of GPT-2's."""
    def ckpt(vocab: int) -> dict:  # nanoGPT's: no vocabulary saved, and its dataset has no meta.pkl
        return dict(model_args=dict(vocab_size=vocab), config=dict(dataset="chars", data_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="the checkpoint's model has 50256 tokens, too few for GPT-2's BPE"):
        checkpoint_meta(ckpt(EOT))
    assert checkpoint_meta(ckpt(EOT + 1)) is None


def test_a_checkpoint_without_its_vocabulary_finds_it_in_its_data_dir(tmp_path):
    """A checkpoint whose config names a data_dir (train.py's, with data_dir set) reads the meta.pkl
    there, not in ./data: sampled from elsewhere, it found none, or another dataset's."""
    folder = tmp_path / "elsewhere" / "chars"
    folder.mkdir(parents=True)
    meta = dict(vocab_size=3, stoi={c: i for i, c in enumerate("abc")}, itos=dict(enumerate("abc")))
    (folder / "meta.pkl").write_bytes(pickle.dumps(meta))
    ckpt = dict(model_args=dict(vocab_size=3), config=dict(dataset="chars", data_dir=str(tmp_path / "elsewhere")))
    assert checkpoint_meta(ckpt) == meta


def test_a_nanogpt_checkpoint_needs_the_vocabulary_of_its_dataset(tmp_path, monkeypatch):
    """nanoGPT's checkpoints save no vocabulary: its dataset's meta.pkl, where training ran, must
    be there and of the model's size. Without it a character model's ids decoded as GPT-2 BPE,
    and with another dataset's, by the wrong table: garbage, with exit status 0."""
    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=len(CHARS))
    torch.save(dict(model=GPT(config).state_dict(), model_args=asdict(config), config=dict(dataset="chars")),
               tmp_path / checkpoint.FILENAME)
    args = [f"--out_dir={tmp_path}", "--device=cpu", "--num_samples=1", "--start=ab", "--max_new_tokens=3"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=r"^gpt.sample: the checkpoint's model has 4 tokens, too few for GPT-2's "
                                         r"BPE, and no character vocabulary was found \(nanoGPT's meta.pkl: none "
                                         r"in data/chars; run where training ran\)$"):
        sample(args)
    meta_pkl = tmp_path / "data" / "chars" / "meta.pkl"
    meta_pkl.parent.mkdir(parents=True)
    for chars in ("abc", CHARS):
        meta_pkl.write_bytes(pickle.dumps(dict(vocab_size=len(chars), stoi={c: i for i, c in enumerate(chars)},
                                                itos=dict(enumerate(chars)))))
        if chars != CHARS:
            with pytest.raises(SystemExit, match=r"^gpt.sample: data/chars/meta.pkl has 3 characters and the "
                                                 r"checkpoint's model 4 tokens: not the vocabulary it was"):
                sample(args)
    assert set(sample(args)[0]) <= set(CHARS)
    whole = meta_pkl.read_bytes()
    for cut in (20, 0):  # (an UnpicklingError, an EOFError)
        meta_pkl.write_bytes(whole[:cut])
        with pytest.raises(SystemExit, match=r"^gpt.sample: data/chars/meta.pkl is not a readable meta.pkl \(cut "):
            sample(args)


def test_no_training_key_is_close_enough_to_a_sampling_key_to_be_refused():
    """gpt.sample refuses a file's key close to one of its own as a misspelling: train.py's own
    keys (those it does not share) must never be, or its config files would not sample."""
    import difflib

    import train
    from gpt.config import MISSPELT
    for key in set(train.DEFAULTS) - set(DEFAULTS):
        assert not difflib.get_close_matches(key, DEFAULTS, n=1, cutoff=MISSPELT), key


def test_a_training_config_file_gives_its_out_dir(tmp_path, capsys):
    """As nanoGPT's sample.py runs one: the keys sampling has (out_dir, device) taken, training's
    passed over; a --key=value sampling lacks is still an error."""
    char_checkpoint(tmp_path)
    config = tmp_path / "train_config.py"
    # Its init_from is where training started (a fine-tuning's GPT-2), not what it wrote: passed over.
    config.write_text(f"out_dir = {str(tmp_path)!r}\ndevice = 'cpu'\nbatch_size = 64\nlearning_rate = 1e-3\n"
                      "init_from = 'gpt2-xl'\n")
    texts = sample([str(config), "--num_samples=1", "--start=ab", "--max_new_tokens=3"])
    assert len(texts) == 1 and len(texts[0]) == 5
    assert capsys.readouterr().err == (f"{config}:5: init_from = 'gpt2-xl' passed over: where training started; "
                                       "out_dir's checkpoint is sampled (or --init_from's model)\n")
    with pytest.raises(SystemExit, match="gpt.sample: --batch_size=2: unknown config key 'batch_size'"):
        sample([str(config), "--batch_size=2"])
    # A sampling key misspelt in a file is not one of training's to pass over (was sampled at the
    # default temperature without a word).
    typo = tmp_path / "sample_config.py"
    typo.write_text(f"out_dir = {str(tmp_path)!r}\nlearning_rate = 1e-3\ntemprature = 0.0\n")
    with pytest.raises(SystemExit, match=r"sample_config.py:3: unknown config key 'temprature' "
                                         r"\(did you mean 'temperature'\?\)"):
        sample([str(typo)])


def test_a_training_config_s_lines_see_its_preset_as_in_train_py(tmp_path):
    """A line after `preset = ...` may use the keys the preset sets, in train.py (its test_config)
    and here alike: gpt.sample refused the file, as naming a key set nowhere."""
    char_checkpoint(tmp_path)
    config = tmp_path / "train_config.py"
    config.write_text(f"preset = 'llama'\nmlp_hidden = 4 * n_embd\n"
                      f"out_dir = {str(tmp_path)!r} + '/' * (n_layer == 12)\n")
    texts = sample([str(config), "--num_samples=1", "--start=ab", "--max_new_tokens=3"])
    assert len(texts) == 1 and len(texts[0]) == 5


def test_the_defaults_are_nanogpts_but_three_samples():
    """README: nanoGPT's sample.py keys and defaults, but num_samples=3; torch's kernels (no
    self-checks to wait for), on this machine's device in its dtype (None: chosen as it runs)."""
    assert {k: DEFAULTS[k] for k in ("init_from", "out_dir", "start", "num_samples", "max_new_tokens",
                                     "temperature", "top_k", "seed", "compile", "kv_cache", "kernels", "device",
                                     "dtype")} == dict(
        init_from="resume", out_dir="out", start="\n", num_samples=3, max_new_tokens=500, temperature=0.8,
        top_k=200, seed=1337, compile=False, kv_cache=True, kernels="torch", device=None, dtype=None)


def test_by_default_three_samples_from_a_newline_each_printed(tmp_path, capsys):
    """Each sample is printed, then nanoGPT's separator line."""
    args = [*without(char_checkpoint(tmp_path), "num_samples", "start"), "--max_new_tokens=3"]
    texts = sample(args)
    assert len(texts) == 3 and all(len(t) == 4 and t[0] == "\n" for t in texts)
    assert capsys.readouterr().out == "".join(f"{t}\n---------------\n" for t in texts)


def test_a_sample_stdout_cannot_encode_is_printed_escaped(tmp_path, ascii_stdout):
    """An ASCII stdout gets the characters it lacks escaped: printing them raised
    UnicodeEncodeError, the samples lost."""
    args, printed = char_checkpoint(tmp_path, chars="aé \n", vocab_size=8), ascii_stdout()
    text = sample([*args, "--start=é", "--max_new_tokens=3"])
    assert text[0].startswith("é") and printed.getvalue().decode("ascii").startswith("\\xe9")


def test_the_default_seed_and_temperature_are_used(tmp_path):
    args = [*char_checkpoint(tmp_path), "--max_new_tokens=20"]
    state = checkpoint.load(tmp_path, "cpu")
    state["model"]["wte.weight"] *= 3  # logits further apart: the temperature shows
    checkpoint.save(state, tmp_path)
    default = sample(args)
    assert default == sample([*args, "--seed=1337", "--temperature=0.8"])
    # (the test's power: another seed, or another temperature, samples another text)
    assert default != sample([*args, "--seed=1338"])
    assert default != sample([*args, "--temperature=1.0"])


def test_top_k_one_takes_the_likeliest_token(tmp_path):
    """top_k=1 leaves one token to draw from: at any temperature and seed, temperature=0's."""
    args = [*char_checkpoint(tmp_path), "--max_new_tokens=20"]
    greedy = sample([*args, "--temperature=0"])
    assert all(sample([*args, "--top_k=1", "--temperature=5.0", f"--seed={s}"]) == greedy for s in (1, 2))
    # top_k=2 draws other tokens (the test's power)
    assert sample([*args, "--top_k=2", "--temperature=5.0"]) != greedy


def test_the_prompt_is_read_from_a_utf8_file(tmp_path):
    """FILE:path is read as UTF-8 whatever the locale (in a C locale, as under cron or a bare
    container, a UnicodeDecodeError); a prompt that only starts with FILE, no colon, is text."""
    args = char_checkpoint(tmp_path, chars="aé \n", vocab_size=8)
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes("aé\n".encode("utf-8"))
    text = sample([*args, f"--start=FILE:{prompt}", "--max_new_tokens=3"])
    assert text[0].startswith("aé\n") and len(text[0]) == 6
    env = os.environ | dict(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0", PYTHONIOENCODING="utf-8")
    done = subprocess.run([sys.executable, "-m", "gpt.sample", *without(args, "start"), f"--start=FILE:{prompt}",
                           "--max_new_tokens=3"], cwd=Path(__file__).parent.parent, env=env, capture_output=True,
                          text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("aé\n")
    args = char_checkpoint(tmp_path, chars="FILET ")
    assert sample([*without(args, "start"), "--start=FILET", "--max_new_tokens=2"])[0].startswith("FILET")


def test_a_prompt_longer_than_the_context_is_kept_whole(tmp_path):
    """A prompt past block_size (8 here) conditions the model on its last 8 tokens, but the sample
    is the whole prompt and what follows, not the prompt cut to the window."""
    args = char_checkpoint(tmp_path)
    assert sample([*without(args, "start"), "--start=" + "ab" * 6, "--max_new_tokens=2"])[0].startswith("ab" * 6)


def test_a_prompt_token_one_past_the_model_s_vocabulary_stops_with_the_reason(tmp_path):
    """A vocabulary of 5 characters, a model of 4 ids: 'e' (id 4) is the first id it lacks."""
    args = char_checkpoint(tmp_path, chars="abcde", vocab_size=4)
    assert len(sample([*args, "--start=d", "--max_new_tokens=2"])[0]) == 3
    with pytest.raises(SystemExit, match="gpt.sample: start: the prompt's token 4 is past the model's 4-token"):
        sample([*args, "--start=e", "--max_new_tokens=2"])


def test_a_bpe_model_padded_past_gpt2_s_tokens_samples_only_gpt2_s(tmp_path):
    """The padded ids (50257..50303) made the likeliest: still never drawn (tiktoken cannot decode them)."""
    args = bpe_checkpoint(tmp_path / "bpe")
    state = checkpoint.load(tmp_path / "bpe", "cpu")
    state["model"]["wte.weight"][:50257] = 0  # every GPT-2 token's logit 0; the padded ones' random
    state["model"]["wte.weight"][50257:] = torch.randn(47, 16) * 10
    checkpoint.save(state, tmp_path / "bpe")
    text = sample([*args, "--start=", "--temperature=0", "--max_new_tokens=4"])
    assert text == ["<|endoftext|>!!!!"]  # all logits 0: the first id


def test_a_bpe_prompt_may_hold_endoftext(tmp_path):
    """As nanoGPT's encode (allowed_special={"<|endoftext|>"})."""
    args = bpe_checkpoint(tmp_path / "bpe")
    text = sample([*args, "--start=Hi<|endoftext|>", "--max_new_tokens=2"])
    assert text[0].startswith("Hi<|endoftext|>")


def test_compile_compiles_the_model_in_place_and_chooses_kernels_for_it(tmp_path, monkeypatch):
    """generate calls the model itself: torch.compile(model)'s wrapper would be bypassed."""
    compiled, asked = [], []
    monkeypatch.setattr(GPT, "compile", lambda self, *a, **k: compiled.append(self))  # not run: slow on CPU
    monkeypatch.setattr(kernels, "choose", lambda *a, **kw: asked.append(kw["compiled"]) or choose(*a, **kw))
    args = [*char_checkpoint(tmp_path), "--max_new_tokens=2"]
    sample(args)
    assert compiled == [] and asked == [False]
    sample([*args, "--compile=True"])
    assert len(compiled) == 1 and isinstance(compiled[0], GPT) and asked == [False, True]


def test_kv_cache_false_samples_without_the_cache(tmp_path, monkeypatch):
    made = []

    class Spy(gpt_model.KVCache):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)
    monkeypatch.setattr(gpt_model, "KVCache", Spy)
    args = [*char_checkpoint(tmp_path), "--max_new_tokens=3", "--num_samples=2"]
    with_cache = sample(args)
    assert len(made) == 2
    assert sample([*args, "--kv_cache=False"]) == with_cache and len(made) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_a_device_it_is_cuda_where_torch_sees_one(tmp_path, monkeypatch):
    """nanoGPT's default device is cuda; here the GPU when there is one, else the CPU."""
    args = [*without(char_checkpoint(tmp_path), "device"), "--max_new_tokens=2"]
    assert len(sample(args)[0]) == 4  # no GPU: the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one torch sees (but cannot count)
    with pytest.raises(SystemExit, match="gpt.sample: device 'cuda': this machine has 0 cuda device"):
        sample(args)


def test_a_subnormal_temperature_takes_the_likeliest_token(tmp_path):
    """1e-320 (a float64 subnormal): a logit over it overflows to inf, unless the likeliest's is
    taken from all first (then 0 / 1e-320 = 0 and the others -inf)."""
    args = [*char_checkpoint(tmp_path), "--max_new_tokens=20"]
    assert sample([*args, "--temperature=1e-320"]) == sample([*args, "--temperature=0"])


@pytest.mark.parametrize("unbuffered", [True, False])
def test_a_reader_that_stops_early_ends_it_quietly(tmp_path, unbuffered):
    """`python -m gpt.sample ... | head`: what the reader does not take is not written, and no
    BrokenPipeError is told, whether the reader left before a print (unbuffered: each print
    written as it is made; here after the first line) or before the buffered lines were flushed
    at exit."""
    # unbuffered, far more samples than the reader waits for: a print after it left fails
    args = [*without(char_checkpoint(tmp_path), "num_samples"), f"--num_samples={200 if unbuffered else 3}",
            "--max_new_tokens=20"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
        {"PYTHONUNBUFFERED": "1"} if unbuffered else {})
    proc = subprocess.Popen([sys.executable, "-m", "gpt.sample", *args], cwd=Path(__file__).parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if unbuffered:
        proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=120) == 1
    assert "Error" not in proc.stderr.read()
