import os
import time

import pytest
import torch

from gpt.config import (ConfigError, check_seed, gpu_dtype, make_current, parse_args, printed_help,
                        read_config_file, training_dtype)

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, dataset="openwebtext", compile=True, n_kv_head=None,
                gradient_accumulation_steps=40, wandb_run_name="gpt2")

# nanoGPT's style of config file: comments, arithmetic, booleans, strings.
NANOGPT_STYLE = '''
# config for training GPT-2 (124M) down to very nice loss of ~2.85 on 1 node of 8X A100 40GB
"""a docstring is allowed"""
wandb_run_name='gpt2-124M'

# these make the total batch size be ~0.5M
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
gradient_accumulation_steps = 5 * 8
learning_rate = 6e-4 / 2
compile = False # override via command line if you like
'''


def test_reads_a_nanogpt_config_file(tmp_path):
    path = tmp_path / "train_gpt2.py"
    path.write_text(NANOGPT_STYLE)
    assert {k: v for k, v, _ in read_config_file(path)} == dict(wandb_run_name="gpt2-124M", batch_size=12,
                                          gradient_accumulation_steps=40, learning_rate=3e-4, compile=False)


def test_later_arguments_win_and_types_are_kept(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("batch_size = 8\ndataset = 'shakespeare_char'\n")
    assignments = parse_args([str(path), "--batch_size=32", "--learning_rate=1", "--dataset=shakespeare",
                              "--n_kv_head=4"], DEFAULTS)
    assert assignments == [("batch_size", 8), ("dataset", "shakespeare_char"), ("batch_size", 32),
                           ("learning_rate", 1.0), ("dataset", "shakespeare"), ("n_kv_head", 4)]
    overrides = dict(assignments)
    assert isinstance(overrides["learning_rate"], float)


def test_earlier_keys_can_be_used(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("batch_size = 4\ngradient_accumulation_steps = 160 // batch_size\n")
    assert dict(parse_args([str(path)], DEFAULTS))["gradient_accumulation_steps"] == 40
    # As nanoGPT's exec sees train.py's globals: the defaults, and what earlier files and
    # arguments set.
    path.write_text("gradient_accumulation_steps = 2 * batch_size\n")
    assert dict(parse_args([str(path)], DEFAULTS))["gradient_accumulation_steps"] == 24
    assert dict(parse_args(["--batch_size=3", str(path)], DEFAULTS))["gradient_accumulation_steps"] == 6


# nanoGPT's finetune_shakespeare.py names its run with a call.
NANOGPT_FINETUNE = """
import time

out_dir = 'out-shakespeare'
wandb_run_name = 'ft-' + str(time.time())
init_from = 'gpt2-xl' # this is the largest GPT-2 model
learning_rate = 3e-5
"""


def test_the_calls_of_nanogpts_configs_are_allowed(tmp_path):
    path = tmp_path / "finetune_shakespeare.py"
    path.write_text(NANOGPT_FINETUNE)
    before = time.time()
    values = {k: v for k, v, _ in read_config_file(path)}
    assert values["init_from"] == "gpt2-xl" and values["learning_rate"] == 3e-5
    assert values["wandb_run_name"].startswith("ft-") and float(values["wandb_run_name"][3:]) >= before


@pytest.mark.parametrize("line", ["import os", "import time as t", "from time import time",
                                  "wandb_run_name = 'ft-' + str(time.time())",  # without `import time`
                                  "wandb_run_name = str(os.getcwd())", "x = __import__('os')",
                                  "x = str(object=1)", "exec('x = 1')", "x.y = 3", "unset += 1",
                                  "x = {**{}}", "a, b = 1, 2, 3", "x = f'{os}'",
                                  "x = batch_size is 1",  # identity, which Python's constants share or not
                                  "batch_size = = 3"])  # not Python at all (a SyntaxError's traceback once)
def test_code_is_refused_with_its_line(tmp_path, line):
    """What a config may not hold is refused as such, by its line, not run until it fails: a `{**{}}`
    or an `unset += 1` read as a KeyError or TypeError of the config's own arithmetic."""
    path = tmp_path / "evil.py"
    path.write_text(f"batch_size = 1\n{line}\n")
    with pytest.raises(ConfigError, match=r"evil.py:2") as refused:
        read_config_file(path)
    assert " fails: " not in str(refused.value)


@pytest.mark.parametrize("line, error", [("x = 1 // (batch_size - 1)", "ZeroDivisionError"),
                                         ("x = 'run-' + 5", "TypeError"), ("x = max()", "TypeError"),
                                         ("x = int('abc')", "ValueError"), ("x = '%*d' % (3, 1)", "ValueError"),
                                         ("x = round(1, -2 ** 100)", "OverflowError")])  # (10 ** 2 ** 100: hung)
def test_a_failing_expression_names_its_line(tmp_path, line, error):
    """An expression that fails is the config's mistake: a ConfigError naming its file, line and
    error (was a traceback, or the error alone)."""
    path = tmp_path / "c.py"
    path.write_text(f"batch_size = 1\n{line}\n")
    with pytest.raises(ConfigError, match=rf"c.py:2: .* fails: {error}"):
        read_config_file(path)


@pytest.mark.parametrize("line", [
    "max_iters = 10 ** 10 ** 10", "max_iters = 2 ** 4096", "dataset = 'a' * 10 ** 10", "dataset = 'a' * 1048577",
    "dataset = [0] * 10 ** 10", "dataset = 'ab'\ndataset *= 10 ** 10",
    # Past the limits a step at a time, or by what a value stands for, not its length:
    "dataset = 'ab' * 500000\ndataset += dataset", "dataset = 'ab' * 500000\ndataset = dataset + dataset",
    "max_iters = 2 ** 4000\nmax_iters *= max_iters", "dataset = ['a' * 1000000] * 1000000",
    "dataset = [0]\n" + "dataset = [dataset, dataset]\n" * 21, "dataset = f'{0:>1000000000}'",
    "dataset = f'{1.5:.1000000000f}'", "dataset = f'{1:>\u0669\u0669\u0669\u0669\u0669\u0669\u0669\u0669\u0669\u0669}'",
    "dataset = '%1000000000d' % 1", "dataset = '%.1000000000f' % 1.5", "dataset = b'%1000000000d' % 1",
    "dataset = b'a' * 10 ** 12",
    # each part within the limits, too many of them on one line:
    "dataset = f'" + "{0:>1000000}" * 3000 + "'", "s = 'a' * 1000000\ndataset = [s + 'b', s + 'b', s + 'b', s + 'b']",
], ids=lambda line: line.replace("\n", "; ")[:48])
def test_a_value_too_large_for_any_key_is_refused_at_once(tmp_path, line):
    """The file's mistake, said at once: computed, it took the machine's memory for hours (or,
    built on line by line, its str() did)."""
    path = tmp_path / "c.py"
    path.write_text(f"batch_size = 1\n{line}\n")
    with pytest.raises(ConfigError, match=r"c.py:\d+: .* fails: OverflowError: the (result|line's values) would"):
        read_config_file(path)
    path.write_text("a = 2 ** 4095\nb = 10 ** 1000\nc = 'ab' * 1000 + 3 * 'c'\nd = 2 ** -2\ne = 2.0 ** 0.5\n"
                    "f = 'a' * 1048576\ng = f'{7:>3}'\nh = round(1234, -2)\ni = round(1234, 10 ** 20)\n"
                    "j = '%%1000000000d|%5.1f' % 2.25\n")
    assert [value for _, value, _ in read_config_file(path)] == [2 ** 4095, 10 ** 1000, "ab" * 1000 + "ccc", 0.25,
                                                                2 ** 0.5, "a" * 2**20, "  7", 1200, 1234,
                                                                "%1000000000d|  2.2"]


def test_a_command_line_value_python_cannot_take_is_a_message(tmp_path):
    """An int past a float's range (an OverflowError's traceback where a float or its range check
    took it), and a literal Python cannot build ({[1]: 2}: unhashable), end in the key's message."""
    defaults = dict(max_iters=600000, learning_rate=6e-4)
    for arg in ("--max_iters=1" + "0" * 400, "--learning_rate=1" + "0" * 400):
        with pytest.raises(ConfigError, match=r"must be a number a float can hold, got an integer of \d+ bits"):
            parse_args([arg], defaults)
    assert parse_args([f"--max_iters={10 ** 300}"], defaults) == [("max_iters", 10 ** 300)]  # (its range: train's)
    assert parse_args([f"--learning_rate={10 ** 308}"], defaults) == [("learning_rate", 1e308)]  # up to float's max
    with pytest.raises(ConfigError, match=r"max_iters must be int like its default 600000, got '\{\[1\]:2\}'"):
        parse_args(["--max_iters={[1]:2}"], defaults)
    path = tmp_path / "c.py"
    path.write_text("max_iters = 10 ** 400\n")
    with pytest.raises(ConfigError, match=r"c.py:1: max_iters must be a number a float can hold"):
        parse_args([str(path)], defaults)


@pytest.mark.parametrize("expression", ["-" * 100_000 + "2", "1+" * 100_000 + "1", "-" * 900 + "2",
                                        "(" * 300 + "1" + ")" * 300])
def test_an_expression_nested_too_deeply_is_refused(tmp_path, expression):
    path = tmp_path / "c.py"
    path.write_text(f"max_iters = {expression}\n")
    with pytest.raises(ConfigError, match=r"c.py(:1)?: (nested too deeply to read|not Python: too many nested)"):
        read_config_file(path)


def test_python_a_config_may_use_beside_assignments(tmp_path):
    """What nanoGPT users write in their configs, which its exec runs: f-strings, conditions,
    comparisons, tuple, augmented and annotated assignments; and whole-number floats for int keys."""
    path = tmp_path / "c.py"
    path.write_text("n_layer = 8\nout_dir = f'out-{n_layer}-{0.5:.2f}-{\"a\"!r}'\n"
                    "compile = False if n_layer < 6 else True\nbias = n_layer > 4 and n_layer != 7\n"
                    "beta1, beta2 = 0.9, 0.95\nmax_iters = 5e3\nmax_iters *= 2\ndropout = 0.0 or 0.1\n"
                    "batch_size: int = 4\nblock_size: int\n")
    defaults = dict(n_layer=12, out_dir="out", compile=True, bias=False, beta1=0.9, beta2=0.99, max_iters=600000,
                    dropout=0.0, batch_size=12, block_size=1024)
    values = dict(parse_args([str(path)], defaults))
    assert values["out_dir"] == "out-8-0.50-'a'" and values["compile"] is True and values["bias"] is True
    assert values["batch_size"] == 4 and "block_size" not in values  # annotated: as exec takes them
    assert (values["beta1"], values["beta2"], values["dropout"]) == (0.9, 0.95, 0.1)
    assert values["max_iters"] == 10000 and type(values["max_iters"]) is int
    with pytest.raises(ConfigError, match="max_iters must be int"):
        parse_args(["--max_iters=5.5"], defaults)
    latin = tmp_path / "latin.py"
    latin.write_bytes("wandb_run_name = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.py: not UTF-8 text"):
        read_config_file(latin)


def test_a_config_that_is_no_regular_file_is_refused_without_waiting(tmp_path):
    """A FIFO waited for a writer, a link to /dev/zero read until the memory was gone."""
    fifo, zeros = tmp_path / "fifo.py", tmp_path / "zeros.py"
    os.mkfifo(fifo)
    zeros.symlink_to("/dev/zero")
    for path in (fifo, zeros, tmp_path):
        with pytest.raises(ConfigError, match=f"^{path}: not a regular file$"):
            read_config_file(path)


def test_a_string_key_takes_the_text_as_typed():
    """--wandb_run_name=2024 is the name 2024 (literal_eval reads an int, which nanoGPT refuses)."""
    assert dict(parse_args(["--wandb_run_name=2024", "--dataset=1e3"], DEFAULTS)) == {
        "wandb_run_name": "2024", "dataset": "1e3"}
    with pytest.raises(ConfigError, match="batch_size must be int"):
        parse_args(["--batch_size=big"], DEFAULTS)


def test_unknown_keys_and_wrong_types_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'batchsize'"):
        parse_args(["--batchsize=3"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"unknown config key 'wandb_name' \(did you mean 'wandb_run_name'\?\)"):
        parse_args(["--wandb_name=x"], DEFAULTS)
    # A config file's mistakes name their line.
    path = tmp_path / "c.py"
    for line, message in (("n_layers = 4", r"unknown config key 'n_layers'$"),
                          ("batch_sise = 4", r"unknown config key 'batch_sise' \(did you mean 'batch_size'\?\)"),
                          ("compile = 'yes'", "compile must be bool"),
                          ("min_lr = base_lr / 10", "`base_lr` is not a key set before this line")):
        path.write_text(f"batch_size = 4\n\n{line}\n")
        with pytest.raises(ConfigError, match=rf"c.py:3: {message}"):
            parse_args([str(path)], DEFAULTS)
    with pytest.raises(ConfigError, match="batch_size must be int"):
        parse_args(["--batch_size=big"], DEFAULTS)
    with pytest.raises(ConfigError, match="compile must be bool"):
        parse_args(["--compile=1"], DEFAULTS)
    # A key may take a second type (train.py's recompute: True, False or a number of blocks).
    assert parse_args(["--compile=1"], DEFAULTS, also={"compile": int}) == [("compile", 1)]
    with pytest.raises(ConfigError, match="compile must be bool or int like its default True, got 'x'"):
        parse_args(["--compile=x"], DEFAULTS, also={"compile": int})
    with pytest.raises(ConfigError, match="batch_size must be int like its default 12, got None"):
        parse_args(["--batch_size=None"], DEFAULTS)
    assert parse_args(["--n_kv_head=None"], DEFAULTS) == [("n_kv_head", None)]
    # A string key given a second type takes values of it from the command line (train.py's kernels).
    defaults = dict(kernels="auto")
    assert parse_args(["--kernels={'attention': 'triton'}"], defaults, also={"kernels": dict}) == [
        ("kernels", {"attention": "triton"})]
    assert parse_args(["--kernels=7"], defaults, also={"kernels": dict}) == [("kernels", "7")]
    # A None default takes None or the type `also` gives it (train.py's device, peak_tflops, ...).
    also = {"device": str, "peak_tflops": float}
    defaults = {**DEFAULTS, "device": None, "peak_tflops": None}
    assert parse_args(["--device=cuda:1", "--peak_tflops=900", "--device=None"], defaults, also=also) == [
        ("device", "cuda:1"), ("peak_tflops", 900.0), ("device", None)]
    with pytest.raises(ConfigError, match="peak_tflops must be float or None, got 'abc'"):
        parse_args(["--peak_tflops=abc"], defaults, also=also)
    with pytest.raises(ConfigError, match="device must be str or None, got 5"):
        parse_args(["--device=5"], defaults, also=also)
    with pytest.raises(ConfigError, match="expected --key=value"):
        parse_args(["--compile"], DEFAULTS)
    with pytest.raises(ConfigError, match="expected a config file"):
        parse_args(["compile=False"], DEFAULTS)
    with pytest.raises(ConfigError, match="expected a config file"):
        parse_args(["-batch_size=3"], DEFAULTS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_and_runs_nothing(flag, capsys, tmp_path, monkeypatch):
    """train.py and gpt.sample take -h/--help (with other arguments too): their docstring and every
    key with its default, and nothing else is done (no data prepared, no checkpoint looked for)."""
    import train
    from gpt import sample

    monkeypatch.chdir(tmp_path)
    for program, args in ((train, [flag, "--max_iters=1"]), (sample, ["--out_dir=nowhere", flag])):
        assert program.main(args) == ([] if program is sample else None)  # no samples, for a caller to iterate
        text = capsys.readouterr().out
        assert text.startswith(program.__doc__.strip().splitlines()[0])
        for key, value in program.DEFAULTS.items():
            assert f"{key}={value!r}" in text, key
    assert not any(tmp_path.iterdir())


def test_only_dash_h_and_dash_dash_help_ask_for_help(capsys):
    """-hx or --helpme is a mistyped argument, to be refused as one: not help printed and the run
    quietly not done."""
    assert not printed_help(["-hx", "--helpme", "--h"], "doc", DEFAULTS)
    assert capsys.readouterr().out == ""


def test_each_operator_and_call_is_pythons(tmp_path):
    """A config's expressions are computed as nanoGPT's exec computes them: any operator or call
    taken for a neighbour (% for //, <= for <, min for max) trains another run than the file says."""
    path = tmp_path / "c.py"
    path.write_text("import math\na = 7 % 3\nb = +2\nc = 2 <= 2\nd = 2 > 2\ne = 'x' in 'xy'\nf = f'{\"s\"!s}'\n"
                    "g = int(2.7)\nh = min(3, 4)\ni = math.ceil(2.1)\nj = [1, 2]\nk = {'a': 1}\n")
    assert {k: v for k, v, _ in read_config_file(path)} == dict(a=1, b=2, c=True, d=False, e=True, f="s", g=2, h=3,
                                                               i=3, j=[1, 2], k={"a": 1})


def test_seed_zero_and_the_largest_are_taken():
    """Seed 0 is a common choice, as is any seed torch's 64-bit generators take: refused, a
    config that trained elsewhere would not run here."""
    check_seed(0)
    check_seed(2**63 - 1)
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 2\*\*63\), got 9223372036854775808"):
        check_seed(2**63)


def test_a_gpu_trains_in_bfloat16_from_ampere_on_an_indexed_one_too(monkeypatch):
    """bf16 where the tensor cores do it (compute capability 8.0, the A100, on), fp16 before; an
    indexed GPU (cuda:1) is a GPU too, not trained in fp32 as a CPU is."""
    assert (gpu_dtype((8, 0)), gpu_dtype((7, 5))) == ("bfloat16", "float16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert (training_dtype("cuda:1"), training_dtype("cuda"), training_dtype("cpu"), training_dtype("mps")) == (
        "bfloat16", "bfloat16", "float32", "float32")


def test_an_indexed_gpu_cuda_0_is_made_current_too(monkeypatch):
    """cuda:0 named while another GPU is current (a caller's torch.cuda.set_device(1)): the kernels'
    self-checks would ask that other one; plain cuda means the current GPU, left as it is."""
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    make_current("cuda:0")
    make_current("cuda")
    make_current("cpu")
    assert made == ["cuda:0"]


def test_augmented_assignment_changes_a_list_in_place_as_python_does(tmp_path):
    """`a += b` extends a list in place, as exec does: a key holding the same list sees it (it kept
    the old one), and any sequence extends it (a tuple was a TypeError); a list the caller's
    defaults hold is left as it was."""
    p = tmp_path / "c.py"
    p.write_text("a = [1]\nb = a\na += (2,)\nc = d = []\nc *= 2\nc += 'x'\nk += [2]\nn = None\ne = n is None\n")
    known = {"k": [1]}
    values = {key: value for key, value, _ in read_config_file(p, known)}
    assert values == dict(a=[1, 2], b=[1, 2], c=["x"], d=["x"], k=[1, 2], n=None, e=True)
    assert known == {"k": [1]}


@pytest.mark.parametrize("text", ["min = 0\nx = min(1, 2)", "import time\ntime = 'now'\nx = time.time()"])
def test_a_key_named_as_a_function_is_no_function(tmp_path, text):
    """exec calls what the name holds by then (a TypeError): the function was called here."""
    p = tmp_path / "c.py"
    p.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"c.py:\d: `(min|time)` is a key set before this line, not what"):
        read_config_file(p)


def test_a_file_with_a_nul_byte_is_not_python(tmp_path):
    p = tmp_path / "c.py"
    p.write_bytes(b"batch_size = 1\n\x00\n")
    with pytest.raises(ConfigError, match=r"c.py: not Python: .*null bytes"):  # (c.py:None: once)
        read_config_file(p)


def test_a_chained_comparison_is_pythons(tmp_path):
    p = tmp_path / "c.py"
    p.write_text("compile = 1 < 3 < 2\n")
    assert {k: v for k, v, _ in read_config_file(p)}["compile"] is False


def test_not_negates(tmp_path):
    p = tmp_path / "c.py"
    p.write_text("compile = not True\n")
    assert {k: v for k, v, _ in read_config_file(p)}["compile"] is False


def test_an_ascii_conversion_escapes(tmp_path):
    p = tmp_path / "c.py"
    p.write_text("s = '\u00e9'\nx = f'{s!a}'\n", encoding="utf-8")
    assert {k: v for k, v, _ in read_config_file(p)}["x"] == "'\\xe9'"


def test_a_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="batch_size must be int"):
        parse_args(["--batch_size=True"], dict(batch_size=12))
