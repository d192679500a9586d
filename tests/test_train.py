import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import kernels
import train
from gpt import checkpoint
from gpt.config import ConfigError
from gpt.model import GPT, GPTConfig, preset
from gpt.sample import main as sample
from tests.test_sample import FIXTURE

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--compile=False",
        "--eval_iters=4", "--log_interval=1", "--learning_rate=3e-3", "--warmup_iters=5", "--dropout=0.1"]

# nanoGPT's config/train_shakespeare_char.py, as a nanoGPT user has it.
NANOGPT_SHAKESPEARE_CHAR = """
# train a miniature character-level shakespeare model
# good for debugging and playing on macbooks and such

out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
"""


def run(out_dir, data_dir, *args, preset=None):
    first = [f"--preset={preset}"] if preset else []  # a preset sets the keys before it: put it first
    train.main([*first, *TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *args])
    return read_log(out_dir)


def read_log(out_dir):
    with open(f"{out_dir}/log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_an_interrupted_run_stops_its_clock_sampler_and_closes_its_log(tmp_path, data_dir, monkeypatch):
    """Called in a long-lived process (a notebook, a sweep), a run that ends in an error or an
    interrupt leaves no NVML sampling thread running, no log open, and SIGTERM's handler and
    torch's settings (train.torch_settings) as they were."""
    closed, entered, lr_at, handler = [], [], train.lr_at, signal.getsignal(signal.SIGTERM)

    class Recorded(train.ExitStack):
        def enter_context(self, cm):
            entered.append(cm)
            return super().enter_context(cm)

    def interrupted(it, c):
        if it == 3:
            raise KeyboardInterrupt
        return lr_at(it, c)
    monkeypatch.setattr(train, "ExitStack", Recorded)
    monkeypatch.setattr(train.MFUMeter, "close", lambda self: closed.append(self))
    monkeypatch.setattr(train, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, data_dir, "--max_iters=10", "--log_interval=1")
    settings, log, preemption = entered
    assert settings.gen.__name__ == "torch_settings" and len(closed) == 1 and log.name == str(tmp_path / "log.jsonl") and log.closed
    assert isinstance(preemption, train.Preemption) and signal.getsignal(signal.SIGTERM) is handler


def test_a_second_run_in_the_process_while_one_trains_is_refused(tmp_path, data_dir, monkeypatch):
    """Two runs in threads of one process (a sweep's thread pool) would each set torch's default
    dtype, TF32 switches and generators under the other: the second is refused, and once the
    first has ended (whichever way) the next may run."""
    stepping, go_on, lr_at, errors = threading.Event(), threading.Event(), train.lr_at, []

    def held(it, c):  # the first run's, in its thread
        if it == 1 and threading.current_thread() is thread:
            stepping.set()
            go_on.wait(60)
            raise KeyboardInterrupt
        return lr_at(it, c)

    def first():
        try:
            run(tmp_path / "a", data_dir, "--max_iters=3")
        except KeyboardInterrupt:
            pass
        except BaseException as e:
            errors.append(e)
    monkeypatch.setattr(train, "lr_at", held)
    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert stepping.wait(60)
        with pytest.raises(SystemExit, match="another run is training in this process"):
            run(tmp_path / "b", data_dir, "--max_iters=1")
    finally:
        go_on.set()
        thread.join()
    assert errors == [] and not train._running.locked()


def test_tiny_training_run_loss_falls_and_checkpoints(tmp_path, data_dir):
    log = run(tmp_path, data_dir, "--max_iters=80", "--eval_interval=40", "--lr_decay_iters=80")
    evals = [r for r in log if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 40, 80]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(80))
    for key in ("lr", "grad_norm", "step_ms", "tokens_per_s", "mem_peak_gb"):
        assert steps[-1][key] > 0
    assert "step_ms" not in steps[0] and "mfu" not in steps[0]  # the first step compiles and warms up: untimed
    assert (tmp_path / "ckpt.pt").exists()
    # On the CPU in fp32 even with a GPU here: bf16 logits that differ in rounding (another
    # kernel, compiled or not) can sample another token.
    args = [f"--out_dir={tmp_path}", "--num_samples=1", "--max_new_tokens=20", "--start=ROMEO:", "--device=cpu",
            "--dtype=float32"]
    text = sample(args)
    assert text[0].startswith("ROMEO:") and len(text[0]) == 26
    # Without the KV cache, and compiled, the same seed samples the same text.
    assert sample([*args, "--kv_cache=False"]) == text
    assert sample([*args, "--compile=True"]) == text


def test_resume_continues_exactly(tmp_path, data_dir, capsys):
    # On the CPU even with a GPU here: bit-equality also needs deterministic kernels, and torch's
    # CUDA attention backward accumulates with atomics.
    cpu = ["--device=cpu", "--dtype=float32"]
    whole = run(tmp_path / "whole", data_dir, *cpu, "--max_iters=12", "--eval_interval=6", "--always_save_checkpoint=True")
    run(tmp_path / "split", data_dir, *cpu, "--max_iters=6", "--eval_interval=6", "--always_save_checkpoint=True")
    split = run(tmp_path / "split", data_dir, *cpu, "--max_iters=12", "--eval_interval=6", "--init_from=resume")
    losses = lambda log: {r["iter"]: r["loss"] for r in log if "loss" in r}  # noqa: E731
    resumed, uninterrupted = losses(split), losses(whole)
    assert sorted(resumed) == list(range(12))  # the resumed run appends to the first half's log
    for it in range(6, 12):
        assert resumed[it] == uninterrupted[it], it
    # ... record for record: the first half's evaluation at its checkpoint is not logged twice
    trained = lambda log: [(r["iter"], "loss" in r) for r in log if "kernels" not in r]  # noqa: E731
    assert trained(split) == trained(whole)
    # Each run's first record says which backend ran each op.
    assert [(r["iter"], r["kernels"]["attention"]) for r in split if "kernels" in r] == [(0, "torch"), (6, "torch")]
    # A run killed past its last checkpoint logged steps a resume takes again: they, and a line the
    # kill tore, give way to the resumed run's.
    with open(tmp_path / "split" / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": 12, "loss": 99.0}) + "\n" + '{"iter": 13, "lo')
    again = run(tmp_path / "split", data_dir, *cpu, "--max_iters=12", "--eval_interval=6", "--init_from=resume",
                "--n_layer=3")
    assert again[:-2] == split[:-1] and again[-2]["iter"] == 12 and "kernels" in again[-2]
    assert again[-1]["iter"] == 12 and "val_loss" in again[-1]
    assert "the checkpoint's architecture, not the config's n_layer 3 (it has 2)" in " ".join(
        capsys.readouterr().out.split())
    scored = run(tmp_path / "split", data_dir, *cpu, "--eval_only=True")
    assert scored[:-2] == again and scored[-1]["eval_only"] and scored[-1]["init_from"] == "scratch"  # appended, marked
    assert scored[-2]["kernels"] and scored[-2]["eval_only"]
    capsys.readouterr()
    again = run(tmp_path / "split", data_dir, *cpu, "--max_iters=2", "--eval_interval=2")
    assert [r["iter"] for r in again if "loss" in r] == [0, 1]  # a new run in the same out_dir: a new log
    # ... and the last run's checkpoint and log set aside together: a resume cannot take that
    # checkpoint for this run's (as it did until this run first saved, if ever)
    earlier = tmp_path / "split" / "earlier"
    assert f"held an earlier run's checkpoint: moved with its log to {earlier}" in \
        " ".join(capsys.readouterr().out.split())
    assert checkpoint.load(earlier, "cpu")["iter_num"] == 12
    assert max(row["iter"] for row in read_log(earlier)) == 12


def sigterm_once_it_steps(run_: subprocess.Popen, out_dir: Path, pid=None) -> tuple[str | None, str | None]:
    """A SIGTERM to train.py's run `run_` (or to the process `pid()` names) once its log holds a
    step; then what it printed (communicate's), when it has exited."""
    try:
        deadline = time.monotonic() + 240
        while not (out_dir / "log.jsonl").exists() or not any("loss" in r for r in read_log(out_dir)):
            assert run_.poll() is None, run_.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(pid() if pid else run_.pid, signal.SIGTERM)
        return run_.communicate(timeout=120)
    finally:
        run_.kill()


def test_sigterm_ends_the_step_saves_and_stops(tmp_path, data_dir):
    """A scheduler's SIGTERM (a preemption, `timeout`) mid-run: the run ends its step, saves where
    it stands and exits with SIGTERM's status; resumed, it goes on as if never stopped."""
    cpu = ["--device=cpu", "--dtype=float32", "--eval_interval=1000", "--lr_decay_iters=40",
           "--always_save_checkpoint=True"]
    args = [*TINY, *cpu, f"--data_dir={data_dir}"]
    stopped = tmp_path / "stopped"
    run_ = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={stopped}", "--max_iters=1000000"],
                            cwd=Path(train.__file__).parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _, err = sigterm_once_it_steps(run_, stopped)
    assert run_.returncode == 128 + signal.SIGTERM, err
    at = checkpoint.load(stopped, "cpu")["iter_num"]
    assert max(r["iter"] for r in read_log(stopped) if "loss" in r) == at - 1  # its last step was saved
    assert f"stopped by SIGTERM at iter {at}: its checkpoint is in {stopped}" in " ".join(err.split())
    resumed = run(stopped, data_dir, *cpu, "--init_from=resume", f"--max_iters={at + 2}")
    whole = run(tmp_path / "whole", data_dir, *cpu, f"--max_iters={at + 2}")
    losses = lambda log: {r["iter"]: r["loss"] for r in log if "loss" in r}  # noqa: E731
    assert losses(resumed) == losses(whole)


@pytest.fixture
def sigterm_at(monkeypatch):
    """Preemption.requested answering yes at iteration `at[0]`, from its `at[1]`-th question there
    on (the first: at the iteration's start; then one after each batch of an evaluation)."""
    at, seen, lr_at = [None, 1], [], train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda it, c: seen.append([it, 0]) or lr_at(it, c))  # once an iteration

    def requested(self):
        seen[-1][1] += 1
        it, asked = seen[-1]
        return it == at[0] and asked >= at[1]
    monkeypatch.setattr(train.Preemption, "requested", requested)
    return at


@pytest.mark.parametrize("at, always, saved_at, says", [
    (0, True, None, "stopped by SIGTERM at iter 0: no step since the run started, nothing saved"),
    (2, True, 2, "stopped by SIGTERM at iter 2: its checkpoint is in"),  # before iter 2's evaluation
    (3, False, 2, "stopped by SIGTERM at iter 3: always_save_checkpoint=False: the checkpoint stays the best "
                  "evaluation's"),
    (2, False, 2, "stopped by SIGTERM at iter 2: its checkpoint is in"),  # no best to keep: saved
])
def test_sigterm_stops_before_an_evaluation_saving_nothing_before_a_step_nor_over_the_best(
        at, always, saved_at, says, tmp_path, data_dir, sigterm_at, capsys):
    """A SIGTERM is acted on before an evaluation (which might outlast the scheduler's grace; the
    resumed run makes it). With always_save_checkpoint=False, out_dir's checkpoint is the best
    evaluation's (nanoGPT's meaning): a SIGTERM does not save over it, only where there is none."""
    sigterm_at[0] = at
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, data_dir, "--device=cpu", "--max_iters=100", "--eval_interval=2",
            f"--always_save_checkpoint={always}")
    assert stop.value.code == 128 + signal.SIGTERM and says in " ".join(capsys.readouterr().err.split())
    assert checkpoint.exists(tmp_path) == bool(saved_at)
    assert saved_at is None or checkpoint.load(tmp_path, "cpu")["iter_num"] == saved_at
    assert [r["iter"] for r in read_log(tmp_path) if "val_loss" in r] == [it for it in (0, 2) if it < at]


@pytest.mark.parametrize("question", [2, 6, 9])  # after the first batch, within val's, after the last
def test_sigterm_during_an_evaluation_stops_it_and_saves(question, tmp_path, data_dir, sigterm_at, capsys):
    """An evaluation may outlast the scheduler's grace time: a SIGTERM that comes during one ends
    it at the next batch, and the run saves where it stands, as before an evaluation."""
    sigterm_at[:] = [2, question]  # iter 2's evaluation: 2 x 4 batches, a question after each
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, data_dir, "--device=cpu", "--max_iters=6", "--eval_interval=2", "--always_save_checkpoint=True")
    assert stop.value.code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at iter 2: its checkpoint is in {tmp_path}" in " ".join(capsys.readouterr().err.split())
    assert checkpoint.load(tmp_path, "cpu")["iter_num"] == 2
    log = read_log(tmp_path)
    assert [r["iter"] for r in log if "val_loss" in r] == [0] and max(r["iter"] for r in log) == 1


def test_eval_only_leaves_sigterm_fatal(tmp_path, data_dir, monkeypatch):
    """An evaluation saves nothing: a SIGTERM stops it at once, as before there was a handler."""
    run(tmp_path, data_dir, "--device=cpu", "--max_iters=1", "--eval_interval=1")
    monkeypatch.setattr(train, "Preemption", lambda parallel: pytest.fail("eval_only took SIGTERM's handler"))
    run(tmp_path, data_dir, "--device=cpu", "--init_from=resume", "--eval_only=True")


def test_a_run_trains_in_float32_whatever_the_callers_default_dtype_and_gives_it_back(tmp_path, data_dir):
    """train.main called from a script that set float64 as torch's default dtype: the model was
    built in it (trained in float64 on torch's ops; triton's refused it at the first step)."""
    torch.set_default_dtype(torch.float64)
    try:
        run(tmp_path, data_dir, "--device=cpu", "--max_iters=1", "--eval_interval=1", "--always_save_checkpoint=True")
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert {t.dtype for t in checkpoint.load(tmp_path, "cpu")["model"].values()} == {torch.float32}


def test_a_run_prints_to_an_ascii_stdout(tmp_path, data_dir, ascii_stdout):
    """train.py's own text is ASCII: its summary's '×' and the MFU line's '·' raised
    UnicodeEncodeError on an ASCII stdout (PYTHONIOENCODING=ascii) before the first step. Its
    lines are whole at any width: a step's line cut at a pipe's 80 columns is two lines to grep."""
    printed = ascii_stdout()
    run(tmp_path, data_dir, "--device=cpu", "--max_iters=1")
    assert b"tokens per step" in printed.getvalue()
    assert any(line.startswith(b"iter 0: loss") and line.endswith(b"GB") for line in printed.getvalue().splitlines())


def test_a_run_in_another_thread_leaves_sigterm_as_it_was(capsys):
    """Only the main thread may set a signal's handler (and Python runs them there): train.main
    called in another thread runs without one, and says so."""
    seen = []

    def run_():
        with train.Preemption(parallel=False) as preemption:
            seen.append((signal.getsignal(signal.SIGTERM), preemption.requested()))
    harness = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (gpu_session.sh's deadline sets one)
    try:
        thread = threading.Thread(target=run_)
        thread.start()
        thread.join()
    finally:
        signal.signal(signal.SIGTERM, harness)
    assert seen == [(signal.SIG_DFL, False)]
    assert "a SIGTERM ends the process without saving" in capsys.readouterr().err


def test_a_callers_own_sigterm_handler_is_kept():
    """A process that handles SIGTERM itself (a test harness's deadline, an application that
    embeds the run) keeps its handler through the run: the signal reaches it, not the run."""
    caught = []

    def mine(signum, frame):
        caught.append(signum)
    before = signal.signal(signal.SIGTERM, mine)
    try:
        with train.Preemption(parallel=False) as preemption:
            kept = signal.getsignal(signal.SIGTERM) is mine
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # (Python runs the handler between bytecodes, soon after)
            requested = preemption.requested()
        kept = kept and signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
    assert (kept, caught, requested) == (True, [signal.SIGTERM], False)


def test_resume_keeps_a_final_evaluation_off_the_interval(tmp_path, data_dir):
    """A run's last evaluation, at max_iters 3 off its eval_interval of 2, saved the checkpoint; the
    resumed run does not evaluate at 3 again (its next is at 4), so the log keeps that one."""
    cpu = ["--device=cpu", "--dtype=float32", "--eval_interval=2", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *cpu, "--max_iters=3")
    log = run(tmp_path, data_dir, *cpu, "--max_iters=6", "--init_from=resume")
    assert [r["iter"] for r in log if "val_loss" in r] == [0, 2, 3, 4, 6]
    assert [r["iter"] for r in log if "loss" in r] == list(range(6))


def test_resume_takes_the_configs_training_settings(tmp_path, data_dir):
    """As nanoGPT's: the checkpoint sets the architecture, the config the dropout; a run without a
    loss scale (fp32) resumes in fp16; eval_only scores the resumed model off the eval interval
    and saves nothing."""
    cpu = ["--device=cpu", "--max_iters=3", "--eval_interval=3", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *cpu, "--dtype=float32", "--dropout=0.2")
    assert checkpoint.load(tmp_path, "cpu")["model_args"]["dropout"] == 0.2
    log = run(tmp_path, data_dir, *cpu, "--dtype=float16", "--dropout=0.0", "--init_from=resume", "--max_iters=5",
              "--n_layer=3", "--block_size=64")  # architecture keys: the checkpoint's 2 layers and 32 win
    assert [r["iter"] for r in log if "loss" in r][-2:] == [3, 4]
    saved = checkpoint.load(tmp_path, "cpu")
    assert (saved["iter_num"], saved["model_args"]["dropout"], saved["model_args"]["n_layer"]) == (5, 0.0, 2)
    assert saved["model_args"]["block_size"] == 32
    assert saved["scaler"]["scale"] > 0  # fp16's loss scale, saved for the next resume
    before = (tmp_path / "ckpt.pt").stat().st_mtime_ns
    log = run(tmp_path, data_dir, "--device=cpu", "--init_from=resume", "--eval_only=True", "--eval_interval=4")
    assert "loss" not in log[-1] and log[-1]["iter"] == 5 and log[-1]["val_loss"] > 0
    assert (tmp_path / "ckpt.pt").stat().st_mtime_ns == before


def test_wandb_logs_each_record_at_its_iteration(tmp_path, data_dir, monkeypatch):
    """With wandb_log=True every record goes to wandb at its iteration's step (an iteration's
    eval and step records were two wandb steps, and a chart's x axis was not the iteration), the
    evaluation's losses under nanoGPT's names."""
    import importlib.machinery
    import types

    logged = []
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    wandb.init = lambda **kwargs: None
    wandb.log = lambda record, step: logged.append((step, record))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run(tmp_path, data_dir, "--device=cpu", "--max_iters=2", "--eval_interval=2", "--log_interval=1",
        "--wandb_log=True")
    steps = [step for step, _ in logged]
    assert logged and all(step == r["iter"] for step, r in logged) and steps == sorted(steps)
    evals = [r for _, r in logged if "val/loss" in r]
    assert [r["iter"] for r in evals] == [0, 2] and all(r["train/loss"] > 0 and "val_loss" not in r for r in evals)


def test_resuming_on_a_dataset_of_more_tokens_is_refused(tmp_path, data_dir):
    """A character-level checkpoint (65 ids) resumed on GPT-2 BPE data: ids past its vocabulary
    would index nothing (an IndexError on the CPU, a device assert on a GPU)."""
    cpu = ["--device=cpu", "--dtype=float32", "--max_iters=1", "--eval_interval=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *cpu)
    with pytest.raises(SystemExit, match="init_from=resume has a 65-token vocabulary; dataset shakespeare has 50257"):
        run(tmp_path, data_dir, *cpu, "--init_from=resume", "--dataset=shakespeare", "--max_iters=2")


def test_a_gpt2_model_does_not_train_on_character_data(tmp_path, data_dir):
    """GPT-2's weights read ids as BPE tokens: fine-tuned on a character dataset's ids (as many
    as fit its vocabulary) each id would mean another token, and the run learn nonsense."""
    with pytest.raises(SystemExit, match="was trained on GPT-2's BPE tokens; dataset shakespeare_char holds the 65"):
        run(tmp_path, data_dir, "--device=cpu", f"--init_from={FIXTURE}", "--dataset=shakespeare_char",
            "--block_size=16")


def test_resuming_on_another_vocabulary_of_the_same_size_is_refused(tmp_path, data_dir):
    """A character-level checkpoint resumed on a dataset of as many characters but other ones:
    every id would mean another character."""
    cpu = ["--device=cpu", "--dtype=float32", "--max_iters=1", "--eval_interval=1", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *cpu)
    with open(Path(data_dir) / "shakespeare_char" / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    other = Path(data_dir) / "reversed_chars"
    other.mkdir(exist_ok=True)
    for split in ("train", "val"):
        (other / f"{split}.bin").write_bytes((Path(data_dir) / "shakespeare_char" / f"{split}.bin").read_bytes())
    with open(other / "meta.pkl", "wb") as f:
        pickle.dump(dict(meta, stoi={ch: meta["vocab_size"] - 1 - i for ch, i in meta["stoi"].items()}), f)
    with pytest.raises(SystemExit, match=r"dataset reversed_chars holds the 65 tokens of a meta.pkl \(another "
                                         r"vocabulary: their stoi differ\)"):
        run(tmp_path, data_dir, *cpu, "--init_from=resume", "--dataset=reversed_chars", "--max_iters=2")


@pytest.mark.parametrize("settings, named", [
    (["--kahan_summation=True"], "kahan_summation=True: bf16_adamw's rounding of bf16 weights; adamw's are fp32, "
                                 "and it is not used"),
    (["--stochastic_rounding=False", "--kahan_summation=True"],
     "stochastic_rounding=False and kahan_summation=True: bf16_adamw's rounding of bf16 weights; adamw's are fp32, "
     "and they are not used")])
def test_bf16_adamw_s_rounding_under_adamw_is_named_as_unused(settings, named, tmp_path, data_dir, capsys):
    run(tmp_path, data_dir, "--device=cpu", "--optimizer=adamw", *settings, "--max_iters=1")
    assert named in " ".join(capsys.readouterr().out.split())


def test_resume_takes_the_configs_optimizer_settings(tmp_path, data_dir, monkeypatch):
    """The checkpoint's optimizer state, the config's settings: Kahan switched on and stochastic
    rounding off for the resumed steps, then Kahan off again (its compensation dropped). The
    step counts are put where a fused step reads them once the groups hold the run's settings
    (a no-op here, unfused on the CPU: what it sees is checked)."""
    bf16 = ["--device=cpu", "--optimizer=bf16_adamw", "--eval_interval=2", "--always_save_checkpoint=True"]
    run(tmp_path, data_dir, *bf16, "--max_iters=2")
    seen, place = [], checkpoint.steps_on_param_devices
    monkeypatch.setattr(checkpoint, "steps_on_param_devices", lambda optimizer: seen.append(
        {(g["kahan_summation"], g["stochastic_rounding"]) for g in optimizer.param_groups}) or place(optimizer))
    run(tmp_path, data_dir, *bf16, "--max_iters=4", "--init_from=resume", "--kahan_summation=True",
        "--stochastic_rounding=False", "--weight_decay=0.05")
    assert seen == [{(True, False)}]
    saved = checkpoint.load(tmp_path, "cpu")["optimizer"]
    assert {(g["kahan_summation"], g["stochastic_rounding"]) for g in saved["param_groups"]} == {(True, False)}
    assert {g["weight_decay"] for g in saved["param_groups"]} == {0.05, 0.0}  # the decayed group and the rest
    assert all("compensation" in s and s["step"] == 4 for s in saved["state"].values())
    run(tmp_path, data_dir, *bf16, "--max_iters=6", "--init_from=resume")
    saved = checkpoint.load(tmp_path, "cpu")["optimizer"]
    assert all("compensation" not in s and s["step"] == 6 for s in saved["state"].values())


def test_a_checkpoint_of_nanogpt_itself_resumes_and_samples(tmp_path, data_dir, monkeypatch):
    """nanoGPT's ckpt.pt: a compiled model's keys under "transformer.", the causal masks older
    torch kept, only GPT-2's model_args, AdamW's state, no random state and no vocabulary."""
    torch.manual_seed(0)
    nano_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    model = GPT(GPTConfig(**nano_args))
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)
    x = torch.randint(65, (2, 32))
    model(x, x)[1].backward()
    optimizer.step()
    state = {f"_orig_mod.{'' if name.startswith('lm_head') else 'transformer.'}{name}": t
             for name, t in model.state_dict().items()}
    state |= {f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}
    nanogpt = dict(model=state, optimizer=optimizer.state_dict(), model_args=nano_args, iter_num=3,
                   best_val_loss=2.5, config=dict(dataset="shakespeare_char", batch_size=8))
    torch.save(nanogpt, tmp_path / "ckpt.pt")
    log = run(tmp_path, data_dir, "--init_from=resume", "--max_iters=5", "--eval_interval=5", "--bias=True",
              "--always_save_checkpoint=True")
    assert [r["iter"] for r in log if "loss" in r] == [3, 4]
    resumed = checkpoint.load(tmp_path, "cpu")["model"]
    assert not resumed["h.0.ln_1.weight"].equal(model.h[0].ln_1.weight) and "h.0.ln_1.bias" not in resumed
    # nanoGPT's sample.py reads the vocabulary from data/<dataset>/meta.pkl (its config has no
    # data_dir: data/ where it runs); so does ours for its checkpoints.
    torch.save(nanogpt, tmp_path / "ckpt.pt")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "data").symlink_to(data_dir)
    monkeypatch.chdir(tmp_path / "run")
    text = sample([f"--out_dir={tmp_path}", "--device=cpu", "--num_samples=1", "--max_new_tokens=5", "--start=ROMEO:"])
    assert text[0].startswith("ROMEO:") and len(text[0]) == 11


@pytest.mark.parametrize("saved", ["none", "other_world_size"])
def test_a_resume_without_random_state_draws_afresh(saved, data_dir):
    """A checkpoint without random state (nanoGPT's), or saved by another number of processes
    (dropout's generators): what it cannot restore is seeded from the run's seed and the step
    resumed at, the same on every resume there, not left as set up, where it would draw again
    the windows and masks the saved run began with. Each rank draws its own dropout masks; the
    windows, the same (the processes split the micro-steps)."""
    path = train.prepare("shakespeare_char", data_dir)
    console = SimpleNamespace(print=lambda *args: None)

    def draws(iter_num=None, world=SimpleNamespace(rank=0, size=1)):
        batches = train.Batches(path, 8, 2, "cpu", seed=1337)
        torch.manual_seed(1337)  # as train.py sets up rank 0
        if iter_num is not None:
            rng = None if saved == "none" else [{"data": batches.state_dict()}] * 2
            train.restore_random_state(rng, batches, world, "cpu", console, 1337, iter_num)
        return batches.next()[0], torch.randint(2**31, (4,))

    (x, seeds), (x100, seeds100), (again, seeds_again) = draws(), draws(100), draws(100)
    assert not torch.equal(seeds, seeds100) and torch.equal(seeds100, seeds_again)
    assert torch.equal(x100, again) and torch.equal(x, x100) == (saved != "none")  # (a saved sampler goes on)
    assert not torch.equal(draws(200)[1], seeds100)
    (x0, seeds0), (x1, seeds1) = (draws(100, SimpleNamespace(rank=rank, size=3)) for rank in (0, 1))
    assert torch.equal(x0, x1) and not torch.equal(seeds0, seeds1)


def test_a_nanogpt_config_file_runs_unchanged(tmp_path, data_dir, capsys):
    config = tmp_path / "train_shakespeare_char.py"
    config.write_text(NANOGPT_SHAKESPEARE_CHAR)
    train.main([str(config), f"--out_dir={tmp_path / 'out'}", f"--data_dir={data_dir}", "--device=cpu",
                "--compile=False", "--max_iters=1", "--eval_iters=1", "--batch_size=2"])
    log = read_log(tmp_path / "out")
    assert log[0]["iter"] == 0 and log[-1]["iter"] == 1
    # nanoGPT prints "number of parameters: 10.65M" for this config: the summary gives that count too
    assert "10,646,784 without position embeddings: nanoGPT's count" in " ".join(capsys.readouterr().out.split())


def test_a_backend_of_the_users_trains_through_train_py_run_as_itself(tmp_path, data_dir):
    """docs/kernels.md's recipe, as a user has it: a module registering a backend, and a script of
    two lines that imports it and runs train.py as __main__ with the command line's arguments.
    (No dropout: torch's backend, called here, draws its masks from torch's generator, which the
    self-check does not replay.)"""
    (tmp_path / "my_kernels.py").write_text(
        "import kernels\n\n"
        "@kernels.register('layer_norm', 'mine')\n"
        "def layer_norm_mine(*args, **kwargs):\n"
        "    print('mine called', flush=True)\n"
        "    return kernels.get('layer_norm', 'torch')(*args, **kwargs)\n")
    (tmp_path / "my_train.py").write_text("import my_kernels, runpy\n"
                                          "runpy.run_path('train.py', run_name='__main__')\n")
    out, root = tmp_path / "out", Path(train.__file__).parent
    args = [*TINY, "--device=cpu", "--max_iters=1", "--dropout=0", f"--out_dir={out}", f"--data_dir={data_dir}"]
    done = subprocess.run([sys.executable, tmp_path / "my_train.py", *args, "--kernels={'layer_norm': 'mine'}"],
                          cwd=root, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])})
    assert done.returncode == 0, done.stderr
    assert read_log(out)[0]["kernels"]["layer_norm"] == "mine" and "mine called" in done.stdout


@pytest.mark.parametrize("rounding", ["--stochastic_rounding=True", "--kahan_summation=True"])
def test_pure_bf16_training(rounding, tmp_path, data_dir):
    log = run(tmp_path, data_dir, "--optimizer=bf16_adamw", rounding, "--max_iters=30", "--eval_interval=30",
              "--always_save_checkpoint=True", "--n_kv_head=1", "--n_layer=1", preset="llama")
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    state = checkpoint.load(tmp_path, "cpu")
    assert {v.dtype for v in state["model"].values()} == {torch.bfloat16}
    compensated = {"compensation" in s for s in state["optimizer"]["state"].values()}
    assert compensated == {rounding == "--kahan_summation=True"}
    assert state["model_args"]["norm"] == "rmsnorm" and state["model_args"]["n_kv_head"] == 1


def test_checkpoint_of_a_compiled_model_loads(tmp_path):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    model = GPT(config)
    compiled_state = torch.compile(model).state_dict()  # keys carry torch.compile's "_orig_mod." prefix
    assert all(k.startswith("_orig_mod.") for k in compiled_state)
    checkpoint.save(dict(model=compiled_state, model_args=vars(config)), tmp_path)
    loaded = checkpoint.build_model(checkpoint.load(tmp_path, "cpu"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("path", sorted((Path(train.__file__).parent / "config").glob("*.py")), ids=lambda p: p.name)
def test_every_shipped_config_reads(path):
    config, _ = train.read_config([str(path)])
    GPTConfig(**{k: config[k] for k in train.ARCH_KEYS}, vocab_size=64)  # a valid architecture


def test_defaults_and_errors(monkeypatch, tmp_path):
    config, argv = train.read_config([])
    if not torch.cuda.is_available():
        assert argv == [train.DEFAULT_CPU_CONFIG] and config["device"] == "cpu" and config["dtype"] == "float32"
        assert config["n_layer"] == 4 and config["dataset"] == "shakespeare_char"
    config, _ = train.read_config(["--preset=gpt2", "--n_layer=2"])
    assert (config["n_layer"], config["n_embd"], config["bias"]) == (2, 768, True)
    config, _ = train.read_config(["--n_layer=2", "--preset=llama"])  # a preset sets what came before it
    assert (config["n_layer"], config["norm"], config["tie_weights"]) == (12, "rmsnorm", False)
    config, _ = train.read_config(["--n_layer=3", "--preset=None"])  # no preset: nothing set
    assert (config["preset"], config["n_layer"]) == (None, 3)
    assert train.read_config(["--mlp_hidden=512.0"])[0]["mlp_hidden"] == 512
    config, _ = train.read_config([str(train.CONFIG_DIR / "train_gpt2.py")])  # nanoGPT's run: GPT-2's shapes
    assert (config["n_layer"], config["n_embd"], config["bias"]) == (12, 768, False)  # and no biases
    with pytest.raises(SystemExit, match="unknown config key 'n_layers'"):
        train.main(["--n_layers=3"])
    with pytest.raises(SystemExit, match="n_embd 102 is not a multiple of n_head 4"):
        train.main(["--n_head=4", "--n_embd=102"])  # the GPU config's 6 heads would divide it
    with pytest.raises(SystemExit, match="unknown preset 'gpt3'"):
        train.main(["--preset=gpt3"])
    with pytest.raises(SystemExit, match=r"dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'bf16'"):
        train.main(["--dtype=bf16"])
    with pytest.raises(SystemExit, match="n_kv_head must be int or None, got 'two'"):
        train.main(["--n_kv_head=two"])
    with pytest.raises(SystemExit, match="mlp_hidden must be int or None, got 'x'"):
        train.main(["--mlp_hidden=x"])
    for arg, message in (("--peak_tflops=abc", "peak_tflops must be float or None, got 'abc'"),
                         ("--device=5", "device must be str or None, got 5"),  # (tracebacks once)
                         # out of range: an empty batch, a division by zero, NaN losses once
                         ("--batch_size=0", "batch_size must be at least 1, got 0"),
                         ("--log_interval=0", "log_interval must be at least 1, got 0"),
                         ("--eval_iters=0", "eval_iters must be at least 1, got 0"),
                         ("--block_size=0", "GPTConfig: block_size must be at least 1, got 0"),
                         ("--max_iters=-1", "max_iters must be finite and not negative, got -1"),
                         # infinite: NaN losses after the set-up, or a run that never ends
                         ("--learning_rate=1e999", "learning_rate must be finite and not negative, got inf"),
                         ("--weight_decay=-1e999", "weight_decay must be finite and not negative, got -inf"),
                         ("--peak_tflops=1e999", "peak_tflops must be finite and above 0, got inf"),
                         ("--beta2=1.0", r"beta2 must be in \[0, 1\), got 1.0"),
                         ("--peak_tflops=-5", "peak_tflops must be finite and above 0, got -5.0"),
                         # devices this machine lacks (an assertion or AttributeError from deep in torch once)
                         ("--device=gpu", "device 'gpu' is not a device"),
                         ("--device=cuda:99", r"device 'cuda:99': this machine has \d+ cuda device\(s\)"),
                         ("--device=meta", "device 'meta': a model trains and samples on cpu, cuda or mps"),
                         ("--seed=-1", r"seed must be in \[0, 2\*\*63\), got -1"),  # BF16AdamW's traceback once
                         ("--out_dir=", "out_dir must name a directory")):
        with pytest.raises(SystemExit, match=message):
            train.main([arg])
    # Combinations refused before any data is prepared (this dataset does not exist).
    nothing = ["--device=cpu", "--dataset=nosuch"]
    with pytest.raises(SystemExit, match=r"optimizer must be one of \('adamw', 'bf16_adamw'\), got 'bf16adamw'"):
        train.main([*nothing, "--optimizer=bf16adamw"])
    with pytest.raises(SystemExit, match=r"init_from must be scratch, resume, one of \['gpt2', .*got 'gtp2'$"):
        train.main([*nothing, "--init_from=gtp2"])
    with pytest.raises(SystemExit, match="optimizer=bf16_adamw trains in bfloat16, and dtype is float16"):
        train.main([*nothing, "--dtype=float16", "--optimizer=bf16_adamw"])
    # What is missing, before the processes join (init_process_group) and the data is prepared.
    monkeypatch.setattr(train.distributed, "init", lambda *args: pytest.fail("the processes joined first"))
    with pytest.raises(SystemExit, match="init_from=resume: no checkpoint"):
        train.main([*nothing, f"--out_dir={tmp_path / 'empty'}", "--init_from=resume"])
    with pytest.raises(SystemExit, match=f"init_from={tmp_path}: {tmp_path} lacks config.json, model.safetensors"):
        train.main([*nothing, f"--init_from={tmp_path}"])
    monkeypatch.setattr(train.pretrained, "locate", lambda name: pytest.fail(f"{name} downloaded before the checks"))
    with pytest.raises(SystemExit, match="dataset 'nosuch'"):  # a hub model's gigabytes: downloaded after them
        train.main([*nothing, "--init_from=gpt2"])
    with pytest.raises(SystemExit, match="dataset 'nosuch': no .* and no builder for it"):
        train.main(nothing)
    monkeypatch.undo()
    for arg, message in (("--kernels=trition", "kernels must be one of"),
                         ("--backend=ncll", r"backend must be one of \[.*'nccl'.*\], or device:backend pairs "
                                            r"\(cpu:gloo,cuda:nccl\), got 'ncll'"),
                         ("--backend=cpu:gloo,cuda:ncll", "got 'cpu:gloo,cuda:ncll'"),
                         ("--kernels={'layernorm': 'triton'}", r"kernels: unknown ops \['layernorm'\]"),
                         ("--n_embd=30", "n_embd 30 is not a multiple of n_head"),
                         ("--norm=batchnorm", "norm must be one of"),
                         ("--recompute=99", "recompute: True, False or a number of blocks")):
        with pytest.raises(SystemExit, match=message):
            train.main([*nothing, arg])
    with monkeypatch.context() as m:  # as torchrun starts it (one process ignores parallel)
        m.setenv("RANK", "0")
        with pytest.raises(SystemExit, match="parallel=fsdp trains in bfloat16 or float32"):
            train.main([*nothing, "--dtype=float16", "--parallel=fsdp"])


@pytest.mark.parametrize("backend", ["nccl", "gloo", "cpu:gloo,cuda:nccl", "cuda:nccl"])
def test_a_process_group_backend_or_device_backend_pairs_are_taken(backend):
    config, _ = train.read_config(["--device=cpu", f"--backend={backend}"])
    train.check_ranges(config)  # (refuses a misspelt one: test_defaults_and_errors)
    assert config["backend"] == backend


def test_a_preset_in_a_config_file_sets_what_its_later_lines_see(tmp_path):
    path = tmp_path / "config.py"
    path.write_text("n_layer = 2\npreset = 'shakespeare-char'\nn_head = 4\n"
                    "mlp_hidden = 2 * n_embd\nlr_decay_iters = block_size * 10\n")
    config, _ = train.read_config([str(path)])
    # the preset set n_layer over the line before it; the lines after it see its n_embd and block_size
    assert (config["n_layer"], config["n_head"], config["n_embd"]) == (6, 4, 384)
    assert (config["mlp_hidden"], config["lr_decay_iters"]) == (768, 2560)
    path.write_text("n_layer = 2\npreset = 'gtp2'\n")
    with pytest.raises(ConfigError, match=r"config.py:2: unknown preset 'gtp2'"):
        train.read_config([str(path)])
    with pytest.raises(ConfigError, match=r"--preset=gtp2: unknown preset 'gtp2'"):
        train.read_config(["--preset=gtp2"])


def test_data_and_checkpoint_mistakes_stop_with_the_reason(tmp_path, data_dir):
    with pytest.raises(SystemExit, match="train.py: dataset 'nosuch': no .* and no builder"):
        run(tmp_path, data_dir, "--dataset=nosuch")
    with pytest.raises(SystemExit, match=f"train.py: dataset openwebtext is not built yet: run `python -m gpt.data "
                                         f"openwebtext {tmp_path}`"):
        train.main([*TINY, f"--data_dir={tmp_path}", "--dataset=openwebtext"])
    with pytest.raises(SystemExit, match="train.py: init_from=resume: no checkpoint"):
        run(tmp_path / "empty", data_dir, "--init_from=resume")
    with pytest.raises(SystemExit, match="train.py: .*val.bin holds .* tokens, too few for block_size 1000000"):
        run(tmp_path, data_dir, "--block_size=1000000")
    config, _ = train.read_config(["--dropout=0.1", "--preset=gpt2"])  # presets set architecture, not dropout
    assert config["dropout"] == 0.1
    config, _ = train.read_config([str(train.CONFIG_DIR / "train_shakespeare_char.py")])
    assert (config["n_layer"], config["dropout"]) == (6, 0.2)  # nanoGPT's baby GPT


def test_token_ids_past_the_vocabulary_stop_with_the_file(tmp_path):
    """A meta.pkl whose vocab_size is smaller than the ids its .bin files hold: the model's
    embedding would fail on them (an IndexError, a device-side assert on a GPU)."""
    data = tmp_path / "data" / "tiny"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        (np.arange(300) % 31).astype(np.uint16).tofile(data / f"{split}.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump(dict(vocab_size=10), f)
    with pytest.raises(SystemExit, match=r"tiny/train.bin holds token id 30, past the model's 10-token vocabulary"):
        run(tmp_path / "out", tmp_path / "data", "--dataset=tiny", "--device=cpu", "--block_size=16")


def test_the_default_config_and_wandb_are_found_before_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default config is the repository's, from any directory
    assert train.read_config([])[0]["dataset"] == "shakespeare_char"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    with pytest.raises(SystemExit, match="wandb_log=True needs the wandb package"):
        train.main(["--wandb_log=True"])


@pytest.mark.parametrize("decay_iters", [10, 20])
def test_learning_rate_schedule(decay_iters):
    """nanoGPT's: linear warm-up, cosine to min_lr at lr_decay_iters, then min_lr; a decay of no
    length (lr_decay_iters == warmup_iters) goes straight to min_lr."""
    c = dict(decay_lr=True, warmup_iters=10, lr_decay_iters=decay_iters, learning_rate=1e-3, min_lr=1e-4)
    lrs = [train.lr_at(it, c) for it in range(30)]
    assert lrs[0] == pytest.approx(1e-3 / 11) and lrs[9] == pytest.approx(1e-3 * 10 / 11)
    assert lrs[decay_iters:] == [1e-4] * (30 - decay_iters)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    if decay_iters == 20:
        assert lrs[10] == pytest.approx(1e-3) and lrs[15] == pytest.approx(5.5e-4)


@pytest.fixture
def xl_on_80gib(monkeypatch):
    """GPT-2 XL (on the meta device) and a run of it, 32 x 1024 tokens in pure bf16, on a GPU of 80 GiB."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    with torch.device("meta"):
        model = GPT(GPTConfig(**preset("gpt2-xl")))
    return model, dict(device="cuda", optimizer="bf16_adamw", kahan_summation=False, batch_size=32, block_size=1024)


def test_memory_plan_names_the_blocks_to_recompute(xl_on_80gib):
    """On a GPU train.py's summary sets bench/plan.py's peak beside the GPU's memory, and says how
    many blocks to recompute where the run would not fit (GPT-2 XL, 32 x 1024 tokens, pure bf16,
    on 80 GiB: 12 of its 48 blocks, as bench.mfu's plan says)."""
    model, c = xl_on_80gib
    one_gpu = SimpleNamespace(parallel=None, size=1)
    assert train.memory_plan(c, model, one_gpu, "triton").endswith("may not fit: recompute=12 would")
    # torch's AdamW takes no kahan_summation: nothing more planned.
    assert train.memory_plan(dict(c, optimizer="adamw", batch_size=8), model, one_gpu, "triton") == train.memory_plan(
        dict(c, optimizer="adamw", batch_size=8, kahan_summation=True), model, one_gpu, "triton")
    # The plan keeps a tenth of the GPU free (plan.USABLE): a peak between that and all of it may not fit.
    planned = train.memory_plan(dict(c, batch_size=27), model, one_gpu, "triton")
    peak, total = map(float, re.match(r"planned peak ([\d.]+) GB of the GPU's ([\d.]+)", planned).groups())
    assert train.plan.USABLE < peak / total < 1 and "may not fit: recompute=" in planned, planned
    model.recompute_blocks(12)
    assert "planned peak" in train.memory_plan(c, model, one_gpu, "triton")
    assert "may not fit" not in train.memory_plan(c, model, one_gpu, "triton")
    assert "a smaller batch_size would" in train.memory_plan(dict(c, batch_size=1024), model, one_gpu, "triton")
    # Kahan's compensation, 2 bytes a parameter more, is planned too.
    assert train.memory_plan(dict(c, batch_size=36), model, one_gpu, "triton") != train.memory_plan(
        dict(c, batch_size=36, kahan_summation=True), model, one_gpu, "triton")
    # The torch loss's logits (12 bytes a class a token: 19.8 GB here, less the fused loss's 1.7 GB
    # of buffers) take 13 blocks more to recompute.
    planned = train.memory_plan(c, model, one_gpu, "torch")
    assert "with the triton ops; the torch linear_cross_entropy's logits, 12 bytes a class a token)" in planned
    assert planned.endswith("may not fit: recompute=25 would"), planned


def test_running_out_of_gpu_memory_says_what_lowers_the_peak(xl_on_80gib):
    model, c = xl_on_80gib
    with pytest.raises(SystemExit) as stop:
        with train.out_of_memory_explained(c, model, SimpleNamespace(parallel=None, size=1), "triton"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.14 GiB.\nmore of torch's text")
    said = str(stop.value)
    assert said.startswith("train.py: the GPU ran out of memory at batch_size 32 x block_size 1024 with 0 blocks "
                           "recomputed: planned peak "), said
    assert "may not fit: recompute=12 would. A smaller batch_size" in said, said
    assert said.endswith("torch: CUDA out of memory. Tried to allocate 6.14 GiB."), said
    with pytest.raises(torch.OutOfMemoryError):  # another device's: no CUDA GPU to plan for
        with train.out_of_memory_explained(dict(c, device="mps"), model, SimpleNamespace(parallel=None, size=1),
                                           "triton"):
            raise torch.OutOfMemoryError("MPS backend out of memory")


def test_a_compile_failure_with_triton_ops_names_the_ways_around_it(capsys):
    inductor_error = type("InductorError", (RuntimeError,), {"__module__": "torch._inductor.exc"})
    triton = {"attention": kernels.Choice("triton", "asked for"), "swiglu": kernels.Choice("torch", "asked for")}
    for compiled, choices, error, said in ((True, triton, inductor_error, True), (False, triton, inductor_error, False),
                                           (True, {"attention": kernels.Choice("torch", "")}, inductor_error, False),
                                           (True, triton, ValueError, False)):
        with pytest.raises(error):  # the error itself, traceback and all
            with train.compile_failure_explained(compiled, choices):
                raise error("the compiler's own words")
        expected = ("train.py: torch.compile failed on the model with the triton kernels of attention: "
                    "--compile=False runs them without it, --kernels=torch compiles torch's ops")
        err = capsys.readouterr().err
        assert err.startswith(expected) if said else err == "", err


def test_recompute_is_true_false_or_a_block_count(tmp_path, data_dir, capsys):
    assert train.read_config(["--recompute=3"])[0]["recompute"] == 3
    with pytest.raises(SystemExit, match="recompute must be bool or int like its default False, got 1.5"):
        train.main(["--recompute=1.5"])
    with pytest.raises(SystemExit, match="recompute: True, False or a number of blocks from 0 to 2, got 3"):
        run(tmp_path, data_dir, "--recompute=3")
    run(tmp_path, data_dir, "--recompute=1", "--max_iters=2", "--eval_interval=2", "--eval_iters=1")
    assert "1 of 2 blocks recomputed" in " ".join(capsys.readouterr().out.split())  # (rich may wrap the line)


def test_kernels_may_name_a_backend_per_op(tmp_path, data_dir):
    """--kernels={op: backend}, kernels.choose's mapping: those ops on those backends (a triton one
    self-checked at the run's shapes, and refused if it fails), the others on torch; an op the run
    does not call is logged as torch, whatever was asked; an unknown op is refused by name."""
    log = run(tmp_path, data_dir, "--kernels={'layer_norm': 'triton', 'rope': 'triton', 'adamw': 'triton'}",
              "--optimizer=adamw", "--max_iters=1", "--eval_interval=1", "--eval_iters=1", "--batch_size=2")
    assert log[0]["kernels"]["layer_norm"] == "triton"
    assert log[0]["kernels"]["attention"] == log[0]["kernels"]["rope"] == log[0]["kernels"]["adamw"] == "torch"
    # Triton's attention takes head sizes of 32 and up (16 here): refused before the first step.
    with pytest.raises(SystemExit, match=r"attention: its triton backend, asked for, failed its self-check at .*"
                                         r"head dims \(32, 64, 96, 128\), got 16"):
        run(tmp_path, data_dir, "--kernels={'attention': 'triton'}", "--n_embd=32", "--n_head=2", "--max_iters=1")
    with pytest.raises(SystemExit, match=r"kernels: unknown ops \['layernorm'\]"):
        run(tmp_path, data_dir, "--kernels={'layernorm': 'triton'}", "--max_iters=1")


def test_training_with_the_triton_kernels(tmp_path, data_dir, capsys):
    log = run(tmp_path, data_dir, "--n_layer=1", "--n_embd=64", "--n_kv_head=1", "--kernels=triton",
              "--optimizer=bf16_adamw", "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--batch_size=2",
              "--recompute=True", preset="llama")
    out = capsys.readouterr().out
    lines = [line.split() for line in out.replace("│", " ").splitlines()]
    for op in ("rms_norm", "swiglu", "attention", "linear_cross_entropy", "adamw", "grad_norm"):
        assert [op, "triton"] in [line[:2] for line in lines], op
    # rope: attention turns q and k itself; cross_entropy: the loss is the fused one
    for op in ("layer_norm", "rope", "cross_entropy"):
        assert [op, "torch", "not", "used"] in [line[:4] for line in lines], op
    assert "recomputed" in out  # (rich may wrap the line)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)


def test_a_resume_drops_the_log_line_a_killed_write_tore(tmp_path):
    """The steps before the checkpoint stay; a blank line and a line cut mid-write go."""
    log = tmp_path / "log.jsonl"
    log.write_text('{"iter": 0, "loss": 4.2}\n\n{"iter": 1, "loss": 4.1}\n{"iter": 2, "lo')
    train.trim_log(log, iter_num=2, evaluates=True)
    assert log.read_text() == '{"iter": 0, "loss": 4.2}\n{"iter": 1, "loss": 4.1}\n'


def test_with_decay_lr_off_the_learning_rate_is_constant():
    """decay_lr=False: learning_rate at every iteration, no warm-up, no decay to min_lr."""
    c = dict(decay_lr=False, warmup_iters=10, lr_decay_iters=20, learning_rate=1e-3, min_lr=1e-4)
    assert [train.lr_at(it, c) for it in (0, 5, 9, 10, 15, 20, 100)] == [1e-3] * 7
