"""GPT-2 weights in Hugging Face's format (gpt/pretrained.py), read without transformers.

fixtures/hf_gpt2_tiny was written by transformers 5.23.0 (`save_pretrained` of a seeded
GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=24, n_embd=16, n_layer=2, n_head=2)) with
weights redrawn large enough for O(1) activations, where GELU's tanh form and erf's differ);
expected_logits.json holds that model's float64 logits for the token ids beside them, as
transformers computed them.
"""
import dataclasses
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

import train
from gpt import checkpoint, pretrained
from gpt.model import GPT, GPTConfig
from gpt.sample import main as sample
from tests.test_files import aged, temp_name

FIXTURE = Path(__file__).parent / "fixtures" / "hf_gpt2_tiny"
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The safetensors format, written from its specification (independent of the reader under test)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        raw = t.detach().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def fixture_tensors() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pretrained.read_safetensors(FIXTURE / "model.safetensors").items()}


def copy_fixture(dest: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    """FIXTURE copied to dest, with its tensors and config.json keys replaced where given."""
    dest.mkdir(parents=True)
    hf = json.loads((FIXTURE / "config.json").read_text()) | config
    (dest / "config.json").write_text(json.dumps(hf))
    if tensors is None:
        shutil.copy(FIXTURE / "model.safetensors", dest)
    else:
        write_safetensors(dest / "model.safetensors", tensors)
    return dest


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    logits, _ = model.eval()(idx, torch.zeros_like(idx))  # with targets: every position's logits
    return logits[0]


def test_a_hugging_face_checkpoint_gives_its_logits():
    expected = json.loads((FIXTURE / "expected_logits.json").read_text())
    idx = torch.tensor([expected["idx"]])
    model = pretrained.load(str(FIXTURE))
    assert model.config.activation == "gelu_tanh" and model.config.vocab_size == 96
    with torch.no_grad():
        err = (all_logits(model, idx).double() - torch.tensor(expected["logits"], dtype=torch.float64)).abs().max()
    # transformers' own fp32 logits are 2.1e-6 off these (measured, 5.23.0): at most twice that. Exact
    # GELU instead of GPT-2's tanh form would be 1.2e-3 off; a mislaid weight, O(1).
    assert err < 4e-6
    # The folder as a str too, as load takes it, through its two steps.
    built = GPT(pretrained.gpt_config(str(FIXTURE)))
    pretrained.load_weights(built, str(FIXTURE))
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))


def test_the_original_gpt2_layout_loads_the_same_weights(tmp_path):
    # OpenAI's converted checkpoints: no "transformer." prefix, the causal masks kept as buffers;
    # some keep a copy of the tied head. Stored here in float16 to read a 16-bit dtype too; the
    # masks as older transformers wrote them (uint8, bool, float).
    tensors = {k.removeprefix("transformer."): v.half() for k, v in fixture_tensors().items()}
    mask = torch.tril(torch.ones(1, 1, 24, 24))
    tensors |= {"h.0.attn.bias": mask.to(torch.uint8), "h.1.attn.bias": mask.bool(), "h.0.attn.masked_bias": mask}
    tensors["lm_head.weight"] = tensors["wte.weight"]
    model = pretrained.load(str(copy_fixture(tmp_path / "original", tensors)))
    reference = pretrained.load(str(FIXTURE))
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q.half().float()), name
    assert model.lm_head.weight is model.wte.weight


def test_conv1d_weights_are_transposed_into_linear_layers():
    tensors, model = fixture_tensors(), pretrained.load(str(FIXTURE))
    assert torch.equal(model.h[1].attn.c_attn.weight, tensors["transformer.h.1.attn.c_attn.weight"].t())
    assert torch.equal(model.h[0].mlp.c_proj.weight, tensors["transformer.h.0.mlp.c_proj.weight"].t())
    assert torch.equal(model.h[0].ln_2.bias, tensors["transformer.h.0.ln_2.bias"])


def test_a_shorter_block_size_keeps_the_first_positions():
    model = pretrained.load(str(FIXTURE), block_size=10)
    assert model.config.block_size == 10
    assert torch.equal(model.wpe.weight, fixture_tensors()["transformer.wpe.weight"][:10])
    with pytest.raises(ValueError, match="block_size 25 is longer than the model's 24 positions"):
        pretrained.load(str(FIXTURE), block_size=25)


def test_nanogpts_from_pretrained_and_crop_block_size():
    """A nanoGPT user's own script: GPT.from_pretrained(...) then model.crop_block_size(n) gives
    what train.py's init_from with a shorter block_size loads."""
    model = GPT.from_pretrained(str(FIXTURE), dict(dropout=0.1))
    assert model.config.dropout == 0.1
    model.crop_block_size(10)
    cropped = pretrained.load(str(FIXTURE), block_size=10)
    assert model.config == dataclasses.replace(cropped.config, dropout=0.1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), cropped.state_dict().values()))
    model.eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 10))
    assert torch.equal(model(idx)[0], cropped(idx)[0])
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"crop_block_size: block_size must be in \[1, 10\], got 11"):
        model.crop_block_size(11)
    with pytest.raises(ValueError, match="only dropout can be overridden, got \\['bias'\\]"):
        GPT.from_pretrained(str(FIXTURE), dict(bias=False))


def test_bf16_tensors_read_exactly(tmp_path):
    tensors = {"a": torch.randn(3, 5).bfloat16(), "b": torch.randn(7, dtype=torch.float64), "empty": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    read = pretrained.read_safetensors(tmp_path / "t.safetensors")
    assert read.keys() == tensors.keys()
    for name, t in tensors.items():
        assert read[name].dtype == t.dtype and torch.equal(read[name], t), name


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only GPT-2 checkpoints"):
        pretrained.load(str(copy_fixture(tmp_path / "llama", model_type="llama")))
    with pytest.raises(ValueError, match=r"wte.weight is \(96, 16\) in the checkpoint, \(96, 32\) in the model"):
        pretrained.load(str(copy_fixture(tmp_path / "wide", n_embd=32)))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        pretrained.load(str(copy_fixture(tmp_path / "scaled", scale_attn_by_inverse_layer_idx=True)))
    with pytest.raises(ValueError, match="activation_function 'quick_gelu'"):
        pretrained.load(str(copy_fixture(tmp_path / "quick", activation_function="quick_gelu")))
    extra = fixture_tensors() | {"transformer.h.0.attn.q_norm.weight": torch.ones(16)}
    with pytest.raises(ValueError, match=r"unexpected \['h.0.attn.q_norm.weight'\]"):
        pretrained.load(str(copy_fixture(tmp_path / "extra", extra)))
    lacking = {k: v for k, v in fixture_tensors().items() if k != "transformer.ln_f.bias"}
    with pytest.raises(ValueError, match=r"missing \['ln_f.bias'\]"):
        pretrained.load(str(copy_fixture(tmp_path / "lacking", lacking)))
    bytes_bias = fixture_tensors() | {"transformer.ln_f.bias": torch.ones(16, dtype=torch.uint8)}
    with pytest.raises(ValueError, match="ln_f.bias is torch.uint8 in the checkpoint, not floating point"):
        pretrained.load(str(copy_fixture(tmp_path / "bytes", bytes_bias)))
    (tmp_path / "no_weights").mkdir()
    shutil.copy(FIXTURE / "config.json", tmp_path / "no_weights")
    with pytest.raises(ValueError, match="no_weights lacks model.safetensors"):
        pretrained.load(str(tmp_path / "no_weights"))
    ints = tmp_path / "ints.safetensors"
    ints.write_bytes(b"".join([(64).to_bytes(8, "little"),
                               json.dumps({"x": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}).encode().ljust(64),
                               b"\x01"]))
    with pytest.raises(ValueError, match="tensor x has dtype I8"):
        pretrained.read_safetensors(ints)


def test_hub_models_download_once_into_the_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    files = hub / "openai-community" / "gpt2" / "resolve" / "main"
    files.mkdir(parents=True)
    for name in pretrained.FILES:
        shutil.copy(FIXTURE / name, files)
    monkeypatch.setenv("HF_ENDPOINT", hub.as_uri())
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    assert pretrained.is_pretrained("gpt2") and not pretrained.is_pretrained("scratch")
    for word in ("scratch", "resume"):  # train.py's words, whatever folders the working one holds
        (tmp_path / word).mkdir()
    monkeypatch.chdir(tmp_path)
    assert not any(pretrained.is_pretrained(word) for word in ("scratch", "resume", ""))
    folder = pretrained.locate("gpt2")
    assert folder == tmp_path / "cache" / "gpt2"
    for name in pretrained.FILES:
        assert (folder / name).read_bytes() == (FIXTURE / name).read_bytes()
    shutil.rmtree(hub)
    killed = aged(folder / temp_name("model.safetensors"))  # a download killed after the cached one was made
    assert pretrained.locate("gpt2") == folder and not killed.exists()  # cached: no second download, nor leftovers
    with pytest.raises(OSError, match="could not download .*/openai-community/gpt2-medium/resolve/main/config.json"):
        pretrained.locate("gpt2-medium")
    assert not (tmp_path / "cache" / "gpt2-medium").exists()  # nothing left behind


def test_the_cache_folder_needs_a_home_only_where_nothing_else_names_one(tmp_path, monkeypatch):
    """TRITONGPT_CACHE, else XDG_CACHE_HOME's, else the home's .cache: a container's user with no
    home (no HOME, no passwd entry) and TRITONGPT_CACHE set failed all the same, looking it up."""
    def no_home():
        raise RuntimeError("Could not determine home directory.")
    monkeypatch.setattr(pretrained.Path, "home", no_home)
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("TRITONGPT_CACHE")
    assert pretrained.cache_dir() == tmp_path / "xdg" / "tritongpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    with pytest.raises(OSError, match=r"no cache folder for GPT-2's weights \(Could not determine home directory.\): "
                                      r"set TRITONGPT_CACHE"):
        pretrained.cache_dir()


def test_a_download_cut_short_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    class CutShort(io.BytesIO):
        headers = {"Content-Length": "100"}

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: CutShort(b"{" * 60))
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="could not download .*config.json: the connection closed after 60 of 100 bytes"):
        pretrained.locate("gpt2")
    assert list((tmp_path / "cache" / "gpt2").iterdir()) == []


def test_a_weights_file_cut_short_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, {"a": torch.ones(3), "b": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"t.safetensors: tensor b ends at byte .*, past the file's .* \(a file cut "
                                         r"short: delete it \(a hub model's is downloaded again\)\)"):
        pretrained.read_safetensors(path)


def test_a_config_cut_short_is_named_and_a_cache_it_cannot_write_names_its_setting(tmp_path, monkeypatch):
    """A config.json cut short (by a server that sent no Content-Length) says which file; a cache
    folder that cannot be written is not blamed on the download."""
    shutil.copytree(FIXTURE, tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(config.read_text()[:30])
    with pytest.raises(ValueError, match=r"hf/config.json is not whole JSON \(.*\): delete it \(a hub model's is"):
        pretrained.gpt_config(tmp_path / "hf")
    (tmp_path / "taken").write_text("")
    class Response(io.BytesIO):
        headers = {}
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", lambda url, timeout: Response(b"{}"))
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "taken"))
    with pytest.raises(OSError, match=r"could not write \S+/taken/gpt2/config.json \(TRITONGPT_CACHE names another "
                                      r"folder for downloads\): .*Not a directory"):
        pretrained.locate("gpt2")

    def not_found(url, timeout):  # an HTTPError's filename is the URL: the hub's answer, not the disk's
        raise pretrained.urllib.error.HTTPError(url, 404, "Not Found", {}, None)
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", not_found)
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match=r"^could not download https://\S+/config.json: HTTP Error 404: Not Found$"):
        pretrained.locate("gpt2")


def export_hf(model: GPT, folder: Path) -> dict[str, torch.Tensor]:
    """`model` as a Hugging Face GPT-2 checkpoint (its weights under Hugging Face's names returned)."""
    folder.mkdir()
    c = model.config
    hf = {"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
          "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
          "layer_norm_epsilon": c.norm_eps, "tie_word_embeddings": c.tie_weights}
    (folder / "config.json").write_text(json.dumps(hf))
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    tensors = {("" if name == "lm_head.weight" else "transformer.") + name:  # (an untied head's, outside it)
               (p.t() if name.endswith(conv1d) else p).detach().clone() for name, p in model.named_parameters()}
    write_safetensors(folder / "model.safetensors", tensors)
    return tensors


def test_an_untied_head_and_another_epsilon_load_as_the_config_says(tmp_path):
    """tie_word_embeddings false and layer_norm_epsilon 1e-3: the file's own head and epsilon, so
    its logits (the head tied to wte, or eps 1e-5, silently gave others)."""
    model = GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, activation="gelu_tanh",
                          norm_eps=1e-3, tie_weights=False))
    export_hf(model, tmp_path / "hf")
    loaded = pretrained.load(str(tmp_path / "hf"))
    assert (loaded.config.tie_weights, loaded.config.norm_eps) == (False, 1e-3)
    idx = torch.randint(40, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


@pytest.fixture(scope="module")
def bpe_data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


# nanoGPT's config/finetune_shakespeare.py, as a nanoGPT user has it.
NANOGPT_FINETUNE_SHAKESPEARE = """
import time

out_dir = 'out-shakespeare'
eval_interval = 5
eval_iters = 40
wandb_log = False # feel free to turn on
wandb_project = 'shakespeare'
wandb_run_name = 'ft-' + str(time.time())

dataset = 'shakespeare'
init_from = 'gpt2-xl' # this is the largest GPT-2 model

# only save checkpoints if the validation loss improves
always_save_checkpoint = False

# the number of examples per iter:
# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
# shakespeare has 301,966 tokens, so 1 epoch ~= 9.2 iters
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# finetune at constant LR
learning_rate = 3e-5
decay_lr = False
"""


def test_nanogpts_finetune_config_trains_and_samples_from_gpt2_weights(tmp_path, bpe_data_dir):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=16, activation="gelu_tanh"))
    exported = export_hf(model, tmp_path / "tiny-gpt2")
    config = tmp_path / "finetune_shakespeare.py"
    config.write_text(NANOGPT_FINETUNE_SHAKESPEARE)
    # A tiny GPT-2 in gpt2-xl's place (offline). lr 0: one step leaves the weights as loaded, so
    # the checkpoint shows what train.py loaded.
    args = [str(config), f"--init_from={tmp_path / 'tiny-gpt2'}", f"--data_dir={bpe_data_dir}", "--device=cpu",
            "--dtype=float32", "--compile=False", "--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1",
            "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--learning_rate=0",
            "--always_save_checkpoint=True", "--n_layer=6"]
    train.main([*args, f"--out_dir={tmp_path / 'out'}"])
    state = checkpoint.load(tmp_path / "out", "cpu")
    args_saved = state["model_args"]
    assert (args_saved["n_layer"], args_saved["block_size"], args_saved["vocab_size"]) == (1, 16, 50257)
    assert args_saved["activation"] == "gelu_tanh" and args_saved["bias"]
    for name, weight in state["model"].items():
        if name != "lm_head.weight":  # tied: the same tensor as wte
            expected = exported[f"transformer.{name}"]
            expected = expected.t() if expected.dim() == 2 and name.startswith("h.") else expected
            assert torch.equal(weight, expected[:16] if name == "wpe.weight" else expected), name

    text = sample([f"--init_from={tmp_path / 'tiny-gpt2'}", "--num_samples=1", "--max_new_tokens=4",
                   "--start=ROMEO:", "--device=cpu"])
    assert text[0].startswith("ROMEO:")

    with pytest.raises(SystemExit, match="init_from=.*hf_gpt2_tiny has a 96-token vocabulary; dataset shakespeare "
                                         "has 50257 tokens"):
        train.main([*args, f"--init_from={FIXTURE}", f"--out_dir={tmp_path / 'small_vocab'}"])
    # Its 96 ids cover the 65 characters', but they are other tokens (nanoGPT would train on).
    with pytest.raises(SystemExit, match="init_from=.*hf_gpt2_tiny was trained on GPT-2's BPE tokens; dataset "
                                         "shakespeare_char holds the 65 tokens of a meta.pkl"):
        train.main([*args, f"--init_from={FIXTURE}", "--dataset=shakespeare_char", f"--out_dir={tmp_path / 'chars'}"])
    with pytest.raises(SystemExit, match="init_from must be scratch, resume, one of"):
        train.main([*args, "--init_from=gpt3", f"--out_dir={tmp_path / 'unknown'}"])


def test_a_checkpoint_that_is_not_gpt2_s_is_named_not_a_traceback(tmp_path):
    """config.json without a key the model needs, or not an object; a weights header entry that
    is not a tensor's, or a header that is not JSON: a ValueError naming the file (KeyError,
    AttributeError and the like once)."""
    shutil.copytree(FIXTURE, tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    hf = json.loads(config.read_text())
    for broken, message in (({k: v for k, v in hf.items() if k != "n_positions"},
                             "config.json is no GPT-2 config: it has no n_positions"),
                            ([1], "config.json is no model's config: not a JSON object"),
                            ({"model_type": "llama"}, "hf: model_type 'llama'; only GPT-2 checkpoints load")):
        config.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=message):
            pretrained.gpt_config(tmp_path / "hf")
    path = tmp_path / "t.safetensors"
    for header in (b'{"a": {"shape": [1], "data_offsets": [0, 4]}}', b"[1]", b"\xff{"):
        path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
        with pytest.raises(ValueError, match=r"t.safetensors: .*(not a safetensors one|not JSON).*: delete it"):
            pretrained.read_safetensors(path)


def test_an_endpoint_with_a_trailing_slash_gives_the_hub_s_urls(tmp_path, monkeypatch):
    """HF_ENDPOINT=https://mirror/ (as users write it): the files' URLs have no '//' in their path,
    which a mirror may not serve."""
    import urllib.error
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        raise urllib.error.URLError("offline")
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    monkeypatch.setenv("TRITONGPT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OSError, match="could not download"):
        pretrained.locate("gpt2")
    assert urls == ["https://mirror.example/openai-community/gpt2/resolve/main/config.json"]


def test_a_config_json_without_the_keys_hugging_face_defaults_takes_their_defaults(tmp_path):
    """A config.json may leave out the keys whose defaults Hugging Face's GPT2Config gives
    (layer_norm_epsilon 1e-5, tied embeddings, gelu_new): the model is GPT-2's, and its checkpoint
    without an lm_head loads as tied."""
    folder = copy_fixture(tmp_path / "m")
    hf = json.loads((FIXTURE / "config.json").read_text())
    for key in ("layer_norm_epsilon", "tie_word_embeddings", "activation_function"):
        del hf[key]
    (folder / "config.json").write_text(json.dumps(hf))
    config = pretrained.gpt_config(folder)
    assert (config.norm_eps, config.tie_weights, config.activation) == (1e-5, True, "gelu_tanh")
    pretrained.load(str(folder))


def test_n_inner_sets_the_mlp_width(tmp_path):
    """GPT2Config's n_inner (None: 4 n_embd) is the MLP's width: ignored, the weights would not fit."""
    assert pretrained.gpt_config(copy_fixture(tmp_path / "m", n_inner=48)).mlp_hidden == 48
