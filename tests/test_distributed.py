"""Several processes on the CPU with gloo: train.py under torchrun with each `parallel`, against
one process training on the same global batch.

One process draws 8 windows per micro-step for 2 micro-steps; two ranks draw 4 each for 4
micro-steps between them (2 per rank), slicing the same 8 windows: the same global batch, so
losses and grad norms agree to fp32 rounding. Dropout is off where processes are compared: each
rank draws its own masks.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

import train
from bench import plan
from bench.flops import param_count
from gpt import checkpoint, distributed
from gpt.data import Batches, prepare
from gpt.model import GPT, GPTConfig
from gpt.optim import BF16AdamW
from gpt.preemption import Preemption
from gpt.sample import main as sample
from tests.devices import skip_unless_interpreter_runs
from tests.test_checkpoint import WRITE_ITEM
from tests.test_train import sigterm_once_it_steps

REPO = Path(__file__).resolve().parents[1]
# Head size 32, as the Triton attention takes it; lr decays to iteration 9 in every run, so that
# a run stopped at 6 and one resumed from there to 9 follow one schedule.
TINY = ["--device=cpu", "--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=32", "--compile=False",
        "--dropout=0.0", "--eval_iters=2", "--eval_interval=3", "--log_interval=1", "--learning_rate=3e-3",
        "--warmup_iters=2", "--lr_decay_iters=9", "--kernels=torch", "--always_save_checkpoint=True"]
ONE = ["--batch_size=8", "--gradient_accumulation_steps=2"]
TWO = ["--batch_size=4", "--gradient_accumulation_steps=4"]  # per rank: 4 windows × 2 micro-steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(out_dir) -> list[dict]:
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def run(out_dir, data_dir, *args) -> list[dict]:
    """train.py in this process, as one process."""
    train.main([*TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *args])
    return read_log(out_dir)


def torchrun_command(out_dir, data_dir, *args) -> tuple[list[str], dict]:
    """(command, environment) of train.py on two processes under torchrun, on 127.0.0.1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(REPO / "train.py"),
           *TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}", *args]
    # One thread per process on a small machine; the Triton interpreter for Triton ops on a CPU.
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")


def torchrun(out_dir, data_dir, *args) -> tuple[list[dict], str]:
    """train.py on two processes under torchrun: (the log, what rank 0 printed)."""
    cmd, env = torchrun_command(out_dir, data_dir, *args)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return read_log(out_dir), done.stdout


def steps(log) -> dict:
    return {r["iter"]: (r["loss"], r["grad_norm"]) for r in log if "loss" in r}


def evals(log) -> dict:
    return {r["iter"]: (r["train_loss"], r["val_loss"]) for r in log if "val_loss" in r}


def assert_matches(log, reference, rel=1e-5):
    """Every step and evaluation of `log` as in `reference`, to `rel`."""
    for table in (steps, evals):
        got, want = table(log), table(reference)
        assert got and set(got) <= set(want)
        for it, values in got.items():
            assert values == pytest.approx(want[it], rel=rel), (table.__name__, it)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """One process on the global batch: 6 iterations, then resumed to 9. With RANK unset,
    `parallel` means nothing: no process group is made (and so no wrapper)."""
    out = tmp_path_factory.mktemp("one")
    with mock.patch("torch.distributed.init_process_group", side_effect=AssertionError("a process group")):
        run(out, data_dir, *ONE, "--max_iters=6", "--parallel=fsdp")
        return run(out, data_dir, *ONE, "--max_iters=9", "--init_from=resume")


def test_rank_without_local_rank_is_named(monkeypatch):
    """A hand-written launch (mpirun, SLURM) that sets RANK but not LOCAL_RANK."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match="RANK is set but LOCAL_RANK is not"):
        distributed.init("ddp", "gloo", "cpu")
    monkeypatch.setenv("LOCAL_RANK", "abc")  # (int()'s message, naming no variable, once)
    with pytest.raises(ValueError, match="LOCAL_RANK must be the process's index on its node, got 'abc'"):
        distributed.init("ddp", "gloo", "cpu")


@pytest.mark.parametrize("torchrun", [False, True], ids=["left-set", "torchrun"])
def test_a_launch_not_torchrun_s_says_what_it_waits_for(monkeypatch, capsys, torchrun):
    """RANK and WORLD_SIZE left set (by an image, or in a shell opened inside a torchrun worker)
    make a plain `python train.py` join a process group and wait for ranks that never come, for
    30 minutes: it says so first, and how to train alone. torchrun's launches say nothing."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="10.0.0.1",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(distributed.dist, "init_process_group", mock.Mock(side_effect=RuntimeError("joins")))
    with pytest.raises(RuntimeError, match="joins"):
        distributed.init("ddp", "gloo", "cpu")
    said = " ".join(capsys.readouterr().err.split())
    assert ("RANK=0 and WORLD_SIZE=2 are set (not by torchrun): joining their process group at 10.0.0.1:29500, "
            "waiting for every rank; unset RANK to train in one process" in said) != torchrun


def test_a_process_group_left_by_an_earlier_run_is_named(monkeypatch, one_process_group):
    """A run that failed in a notebook whose RANK is set leaves its process group: the next run
    says so and what to call, not torch's "initialize the default process group twice"."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"a process group is initialized in this process already .* "
                                         r"torch.distributed.destroy_process_group\(\) before this run"):
        distributed.init("ddp", "gloo", "cpu")


def test_a_local_rank_past_the_visible_gpus_is_named(monkeypatch):
    """A launcher that shows each process one GPU: rank 1 asks for cuda:1, which it cannot see."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", mock.Mock(side_effect=AssertionError("set_device")))
    with pytest.raises(ValueError, match=r"LOCAL_RANK is 1 but this process sees 1 GPU\(s\)"):
        distributed.init("ddp", "nccl", "cuda")
    # Rank 0 of a one-GPU node is fine: it takes cuda:0 and joins.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "set_device", set_device := mock.Mock())
    monkeypatch.setattr(distributed.dist, "init_process_group", mock.Mock(side_effect=RuntimeError("joins")))
    with pytest.raises(RuntimeError, match="joins"):
        distributed.init("ddp", "nccl", "cuda")
    set_device.assert_called_once_with("cuda:0")


def test_a_rank_joins_on_its_node_s_gpu_under_its_global_rank(monkeypatch):
    """Rank 3 of two nodes of two GPUs: LOCAL_RANK 1 picks cuda:1 (bound to the process group
    too), and the world is told its global rank, not its place on the node: the master is rank 0
    alone, not each node's first."""
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device := mock.Mock())
    monkeypatch.setattr(distributed.dist, "init_process_group", joined := mock.Mock())
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 4)
    world, device = distributed.init("fsdp", "nccl", "cuda")
    assert (world, device) == (distributed.World(rank=3, local_rank=1, size=4, parallel="fsdp"), "cuda:1")
    assert not world.master and not distributed.World(rank=2, local_rank=0, size=4, parallel="ddp").master
    set_device.assert_called_once_with("cuda:1")
    assert joined.call_args.kwargs == dict(backend="nccl", device_id=torch.device("cuda:1"))


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, None])
def test_fsdp_shards_each_block_then_the_root_reducing_in_fp32(monkeypatch, param_dtype):
    """Each block is a unit of its own (gathered only while it runs; the root alone would gather
    the whole model at once), and grads gathered in bf16 are still reduced in fp32."""
    sharded = []
    monkeypatch.setattr(distributed, "init_device_mesh", lambda device_type, shape: ("mesh", device_type, shape))
    monkeypatch.setattr(distributed, "fully_shard", lambda module, mesh, mp_policy: sharded.append((module, mp_policy)))
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=8, vocab_size=16))
    distributed.shard(model, "cpu", param_dtype)
    assert [module for module, _ in sharded] == [*model.h, model]
    reduce_dtype = None if param_dtype is None else torch.float32
    assert all((p.param_dtype, p.reduce_dtype) == (param_dtype, reduce_dtype) for _, p in sharded)


@pytest.mark.parametrize("parallel", [*distributed.PARALLEL, None])
def test_grad_sync_skips_the_reduction_of_all_but_the_last_micro_step(parallel):
    class Model:
        def set_requires_gradient_sync(self, sync):
            self.fsdp_sync = sync
    model = Model()
    for sync in (False, True):
        distributed.grad_sync(distributed.World(parallel=parallel), model, sync)
        if parallel == "fsdp":
            assert model.fsdp_sync is sync and not hasattr(model, "require_backward_grad_sync")
        elif parallel:
            assert model.require_backward_grad_sync is sync and not hasattr(model, "fsdp_sync")
        else:
            assert vars(model) == {}


def test_mean_leaves_its_argument_as_it_was(one_process_group):
    t = torch.tensor([2.0, 4.0])
    averaged = distributed.mean(t)
    assert averaged is not t and torch.equal(averaged, t)


def test_ddp_grads_are_views_of_its_buckets(one_process_group):
    """Else the buckets are a second copy of every grad (4 bytes an fp32 parameter that bench.plan
    does not count)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    ddp = distributed.replicate(model, distributed.World(parallel="ddp"), "cpu")
    ddp(torch.randn(2, 4)).sum().backward()
    assert len({p.grad.untyped_storage().data_ptr() for p in model.parameters()}) == 1


def test_ranks_read_disjoint_slices_of_one_global_batch(data_dir):
    path = prepare("shakespeare_char", data_dir)
    one = Batches(path, block_size=16, batch_size=6, device="cpu", seed=5)
    ranks = [Batches(path, block_size=16, batch_size=2, device="cpu", seed=5, rank=r, world_size=3) for r in range(3)]
    for _ in range(2):
        x, y = one.next()
        slices = [b.next() for b in ranks]
        assert torch.equal(x, torch.cat([s[0] for s in slices])) and torch.equal(y, torch.cat([s[1] for s in slices]))
    x, _ = next(one.eval_batches("val", 1))
    assert torch.equal(x, torch.cat([next(b.eval_batches("val", 1))[0] for b in ranks]))


def test_zero1_keeps_no_copy_of_the_state_it_gathered(one_process_group):
    """ZeroRedundancyOptimizer keeps what consolidate_state_dict gathered (the whole state on rank
    0's host) until the next call; optimizer_state's dict is its only holder, freed with it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = [torch.randn(4, 4, requires_grad=True)]
    zero = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-2)
    params[0].grad = torch.randn(4, 4)
    zero.step()
    state = distributed.optimizer_state(zero)
    assert zero._all_state_dicts == []
    assert torch.equal(state["state"][0]["exp_avg"], zero.optim.state[params[0]]["exp_avg"])


def test_zero1_broadcasts_a_rank_s_params_at_once(one_process_group, monkeypatch):
    """After its step each rank sends the share it updated: laid out in one buffer a rank, that is
    one broadcast a rank, not one a param (75 for GPT-2, 580 for GPT-2 XL with biases)."""
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20))
    optimizer = distributed.optimizer(distributed.World(parallel="zero1"), model.param_groups(0.1),
                                      torch.optim.AdamW, lr=1e-2)
    broadcasts = []
    broadcast = torch.distributed.broadcast
    monkeypatch.setattr(torch.distributed, "broadcast", lambda *a, **k: broadcasts.append(a) or broadcast(*a, **k))
    x = torch.randint(20, (2, 8))
    model(x, x)[1].backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert len(broadcasts) == 1 and len({p.untyped_storage().data_ptr() for p in model.parameters()}) == 1
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # the views were stepped
    assert model.lm_head.weight is model.wte.weight


def test_parallel_must_be_known():
    with pytest.raises(SystemExit, match="parallel must be one of"):
        train.main(["--parallel=zero3"])


def test_ddp_and_zero1_match_one_process(reference, tmp_path, data_dir):
    for parallel in ("ddp", "zero1"):
        log, _ = torchrun(tmp_path / parallel, data_dir, *TWO, "--max_iters=6", f"--parallel={parallel}")
        assert_matches(log, reference)
    # Rank 0 wrote each as one full checkpoint, ZeRO-1's optimizer state consolidated from both
    # ranks' shares: DDP's state to fp32 rounding, with both ranks' RNG states.
    ddp, zero1 = (checkpoint.load(tmp_path / p, "cpu") for p in ("ddp", "zero1"))
    assert len(zero1["rng"]) == 2 and zero1["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]
    for index, state in ddp["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.allclose(zero1["optimizer"]["state"][index][key], value, rtol=1e-4, atol=1e-7), key
    # Both ZeRO-1 on two ranks and one process take it up where the reference is at iteration 6.
    shutil.copytree(tmp_path / "zero1", tmp_path / "one")
    log, _ = torchrun(tmp_path / "zero1", data_dir, *TWO, "--max_iters=9", "--parallel=zero1", "--init_from=resume")
    assert_matches(log, reference)
    assert_matches(run(tmp_path / "one", data_dir, *ONE, "--max_iters=9", "--init_from=resume"), reference)


def test_fsdp_matches_one_process_and_its_sharded_checkpoint_continues_in_one(reference, tmp_path, data_dir):
    out = tmp_path / "fsdp"
    log, _ = torchrun(out, data_dir, *TWO, "--max_iters=6", "--parallel=fsdp")
    assert_matches(log, reference)
    assert (out / checkpoint.SHARDED).is_dir() and not (out / checkpoint.FILENAME).exists()
    [text] = sample([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=8", "--start=A"])
    assert len(text) == 9  # gpt.sample gathers the shards into one model
    # Saved by 2 ranks, loaded into 1 with no process group: the same losses as the reference.
    log = run(out, data_dir, *ONE, "--max_iters=9", "--init_from=resume")
    assert sorted(steps(log)) == list(range(9))
    assert_matches(log, reference)
    assert (out / checkpoint.FILENAME).exists() and not (out / checkpoint.SHARDED).exists()


def test_fsdp_with_the_triton_kernels(reference, tmp_path, data_dir):
    """The Triton ops (the interpreter here) on FSDP's gathered weights and the ranks' activations,
    with the blocks recomputed in backward (FSDP gathers each block's weights again for it)."""
    skip_unless_interpreter_runs()
    log, printed = torchrun(tmp_path, data_dir, *TWO, "--max_iters=2", "--eval_iters=1", "--kernels=triton",
                            "--parallel=fsdp", "--recompute=True")
    for op in ("layer_norm", "attention"):
        assert any(line.split()[:2] == [op, "triton"] for line in printed.replace("│", " ").splitlines()), op
    assert sorted(steps(log)) == [0, 1]
    for it, values in steps(log).items():
        assert values == pytest.approx(steps(reference)[it], rel=1e-5), it


@pytest.mark.parametrize("parallel", ["fsdp", "zero1"])
def test_bf16_adamw_with_clipping_matches_one_process(parallel, tmp_path, data_dir):
    """Pure bf16 with the clipping fused into the step (a low grad_clip, so every step clips): on
    FSDP BF16AdamW steps each rank's local shards, with the norm summed over the ranks' shards; on
    ZeRO-1 each rank's share, with the norm of all the (whole) grads."""
    bf16 = ["--optimizer=bf16_adamw", "--stochastic_rounding=False", "--max_iters=4", "--grad_clip=0.1"]
    one = run(tmp_path / "one", data_dir, *ONE, *bf16)
    two, _ = torchrun(tmp_path / "two", data_dir, *TWO, *bf16, f"--parallel={parallel}")
    assert_matches(two, one, rel=1e-2)  # to bf16 rounding
    assert all(r["grad_norm"] > 0.1 for r in two if "grad_norm" in r)


def test_fsdp_resumes_exactly_with_dropout(tmp_path, data_dir):
    """Each rank's RNG (its dropout masks) and the data sampler come back from the checkpoint."""
    args = [*TWO, "--dropout=0.1", "--parallel=fsdp"]
    whole, _ = torchrun(tmp_path / "whole", data_dir, *args, "--max_iters=6")
    torchrun(tmp_path / "split", data_dir, *args, "--max_iters=3")
    split, _ = torchrun(tmp_path / "split", data_dir, *args, "--max_iters=6", "--init_from=resume")
    assert sorted(steps(split)) == list(range(6))
    assert steps(split) == steps(whole) and evals(split) == evals(whole)


# --- memory per rank against bench.plan ----------------------------------------------------

def _bytes(tensors) -> int:
    """Bytes of the storage under `tensors` (local shards of DTensors), each storage once: DDP's
    grads are views into its buckets, FSDP's shards views into padded flat buffers."""
    storages = {}
    for t in tensors:
        s = (t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _join(rank: int, port: int) -> distributed.World:
    """Rank `rank` of two spawned processes joins their gloo group, as torchrun would start it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return distributed.init("ddp", "gloo", "cpu")[0]


def _leave() -> None:
    torch.distributed.destroy_process_group()
    # Skip the interpreter's teardown: now and then a C++ thread still joinable at exit aborts the
    # process ("terminate called without an active exception", about 1 run in 15 here).
    os._exit(0)


def _memory_worker(rank: int, port: int, config: GPTConfig, out: str) -> None:
    world = _join(rank, port)
    measured = {}
    for optimizer_name in plan.OPTIMIZERS:
        for parallel in distributed.PARALLEL:
            world = dataclasses.replace(world, parallel=parallel)
            torch.manual_seed(0)
            model = GPT(config)
            if optimizer_name == "bf16_adamw":
                model.to(torch.bfloat16)
            if parallel == "fsdp":
                distributed.shard(model, "cpu", None)
            cls = BF16AdamW if optimizer_name == "bf16_adamw" else torch.optim.AdamW
            optimizer = distributed.optimizer(world, model.param_groups(0.1), cls, lr=1e-3)
            x = torch.randint(config.vocab_size, (2, config.block_size))
            _, loss = distributed.replicate(model, world, "cpu")(x, x)
            loss.backward()
            optimizer.step()
            state = (optimizer.optim if parallel == "zero1" else optimizer).state
            params = list(model.parameters())
            measured[optimizer_name, parallel] = (
                _bytes(params), _bytes(p.grad for p in params),
                _bytes(v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim()))  # no step counts
    ranks = distributed.gather(measured)
    if rank == 0:
        torch.save(ranks, out)
    _leave()


def test_memory_per_rank_is_what_bench_plan_counts(tmp_path):
    """Weights, grads and optimizer states each rank holds after a step, measured, against
    bench.plan's static bytes per GPU (what `bench.mfu --world-size 2` prints). FSDP's two
    gathered layers are transient and not counted here."""
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65)
    out = str(tmp_path / "measured.pt")
    torch.multiprocessing.spawn(_memory_worker, args=(free_port(), config, out), nprocs=2)
    ranks = torch.load(out, weights_only=False)
    P = param_count(config)
    assert P == GPT(config).num_params()
    for optimizer in plan.OPTIMIZERS:
        weights, grads, states = (b * P for b in plan.STATE_BYTES[optimizer])
        ddp, zero1, fsdp = ([r[optimizer, p] for r in ranks] for p in ("ddp", "zero1", "fsdp"))
        assert ddp == [(weights, grads, states)] * 2
        assert sum(ddp[0]) == plan.static_bytes(config, optimizer, "ddp", 2)
        # ZeRO-1: whole weights and grads; the states split by parameter, greedily balanced
        assert [r[:2] for r in zero1] == [(weights, grads)] * 2 and sum(r[2] for r in zero1) == states
        for r in zero1:
            assert sum(r) == pytest.approx(plan.static_bytes(config, optimizer, "zero1", 2), rel=0.01)
        # FSDP: all three halved, up to the padding of dim 0 to a multiple of the ranks
        for r in fsdp:
            assert sum(r) == pytest.approx((weights + grads + states) / 2, rel=0.01)


def _rank_0_first_worker(rank: int, port: int, out: str) -> None:
    world = _join(rank, port)
    out, made = Path(out), []

    def prepare_data():  # rank 0's is slow, as a download is
        if world.master:
            time.sleep(0.5)
            (out / "prepared").touch()
        made.append((out / "prepared").exists())
        return len(made)
    returned = distributed.master_first(world, prepare_data)
    if world.master:  # its train state written slowly: the other rank must not return before it is
        write_atomic = checkpoint.write_atomic
        checkpoint.write_atomic = lambda *args: time.sleep(0.5) or write_atomic(*args)
    model = torch.nn.Linear(2, 2)
    checkpoint.save_sharded(model, torch.optim.AdamW(model.parameters()), {"iter_num": 1}, out)
    whole = (out / checkpoint.SHARDED / checkpoint.TRAIN_STATE).exists()
    ranks = distributed.gather((made, returned, whole))
    if world.master:
        torch.save(ranks, out / "ranks.pt")
    _leave()


def test_rank_0_goes_first_and_the_others_wait_for_it(tmp_path):
    """master_first: rank 0 prepares (slowly) while the others wait, then every rank makes again
    and finds it done; save_sharded: no rank returns before rank 0 has made the checkpoint whole."""
    torch.multiprocessing.spawn(_rank_0_first_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "ranks.pt") == [([True, True], 2, True), ([True], 1, True)]


def _rank_0_fails_worker(rank: int, port: int, out: str) -> None:
    world = _join(rank, port)

    def make():
        if world.master:
            raise OSError("the download failed")
        return "made"
    try:
        result = distributed.master_first(world, make)
    except OSError as e:
        result = str(e)
    results = distributed.gather(result)
    if world.master:
        torch.save(results, Path(out) / "results.pt")
    _leave()


def test_rank_0_failing_to_make_leaves_no_rank_waiting(tmp_path):
    """master_first: rank 0's make failing (a download) still lets the other ranks on past the
    barrier, to fail or go on, instead of every one of them waiting for it forever."""
    ranks = torch.multiprocessing.spawn(_rank_0_fails_worker, args=(free_port(), str(tmp_path)), nprocs=2,
                                        join=False)
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the ranks still wait after 120 s")
    assert torch.load(tmp_path / "results.pt") == ["the download failed", "made"]


def test_under_nccl_the_preemption_flag_goes_over_a_gloo_group(monkeypatch):
    """Under NCCL the flag goes over a gloo group of its own, on the host: an NCCL all-reduce would
    wait each step for the GPU's queue (the tests' ranks run gloo: this path runs nowhere else on
    a CPU)."""
    made = []
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.distributed, "new_group", lambda backend: made.append(backend) or "gloo group")
    assert Preemption(parallel=True).group == "gloo group" and made == ["gloo"]
    assert Preemption(parallel=False).group is None and made == ["gloo"]


def _preemption_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    with Preemption(parallel=True) as preemption:
        seen = [preemption.requested()]
        if rank == 1:  # the signal reaches one rank only, between two iterations' questions
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat (torchrun passing the scheduler's on) changes nothing
        with torch.device("meta"):  # a script's default device: the flag goes over gloo from the host all the same
            seen.append(preemption.requested())
    seen = distributed.gather((seen, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL))
    if rank == 0:
        torch.save(seen, Path(out) / "seen.pt")
    _leave()


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration(tmp_path):
    """train.py's SIGTERM (gpt/preemption.py): every rank learns of it at the same question, so all
    save and stop together; on leaving, SIGTERM is fatal again."""
    torch.multiprocessing.spawn(_preemption_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert torch.load(tmp_path / "seen.pt") == [([False, True], True)] * 2


def _rank_process(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (a child of `parent` with RANK set so), if started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                    f"RANK={rank}".encode() in (stat.parent / "environ").read_bytes().split(b"\0"):
                return int(stat.parent.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers in /proc")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # rank 0 writes the checkpoint, or every rank its shards
def test_a_sigterm_to_one_rank_under_torchrun_stops_and_saves_every_rank(parallel, tmp_path, data_dir):
    """train.py under torchrun, evaluating every iteration, and a SIGTERM to rank 1 alone: every
    rank stops at one iteration, saving it together, and each exits with SIGTERM's status (143,
    or killed by torchrun's own SIGTERM as it tears down, once its handler is gone: the same to a
    shell)."""
    cmd, env = torchrun_command(tmp_path, data_dir, *TWO, "--max_iters=100000", "--eval_interval=1",
                                f"--parallel={parallel}")
    run_ = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = sigterm_once_it_steps(run_, tmp_path, pid=lambda: _rank_process(run_.pid, 1))
    at = checkpoint.load(tmp_path, "cpu")["iter_num"]
    assert max(r["iter"] for r in read_log(tmp_path) if "loss" in r) == at - 1, out[-3000:]
    assert f"stopped by SIGTERM at iter {at}: its checkpoint is in {tmp_path}" in " ".join(out.split())
    assert set(re.findall(r"exitcode\s*: (-?\d+)", out)) <= {"143", "-15"}, out[-3000:]


def test_fsdp_shards_the_disk_cannot_take_end_the_run_saying_so_and_keep_the_last(tmp_path, data_dir, monkeypatch):
    """As a full checkpoint (tests/test_train_run.py): the message with the free space, no traceback."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)  # torchrun's one process
    args = [*ONE, "--parallel=fsdp", "--eval_interval=2", "--eval_iters=1"]
    try:
        run(tmp_path, data_dir, *args, "--max_iters=2")
        monkeypatch.setattr(WRITE_ITEM, mock.Mock(side_effect=OSError(28, "No space left on device")))
        with pytest.raises(SystemExit, match=r"^train.py: the checkpoint could not be written \([\d,]+ MiB free "
                                             r"in .*\): torch.distributed.checkpoint could not write the shards of "
                                             r"rank\(s\) 0 \(\[Errno 28\] No space left on device\); the last "
                                             r"one there is as it was$"):
            run(tmp_path, data_dir, *args, "--max_iters=4", "--init_from=resume")
    finally:
        if torch.distributed.is_initialized():  # the run ended before it left its group
            torch.distributed.destroy_process_group()
    assert (tmp_path / checkpoint.SHARDED).is_dir() and checkpoint.load(tmp_path, "cpu")["iter_num"] == 2


def test_ddp_does_not_sync_buffers_each_forward(one_process_group):
    """replicate's DDP broadcasts no buffers before a forward (the rope tables are the same on
    every rank), by the argument this torch takes without a deprecation warning."""
    import warnings

    model = torch.nn.Linear(4, 4)
    model.register_buffer("table", torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ddp = distributed.replicate(model, distributed.World(parallel="ddp"), "cpu")
    assert not getattr(ddp, "forward_sync_buffers", ddp.broadcast_buffers)
