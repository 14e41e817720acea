"""FSDP2 (fully_shard) and multi-node on CPU with gloo, 2 processes. Every launch costs seconds, so the runs are
shared: one module fixture caches the data under two torchrun agents (--nnodes=2, c10d rendezvous on 127.0.0.1)
and trains the single-agent 2-process FSDP reference run (EMA, previews), which raises on both ranks after STEPS
steps: its `-crashed` export (gathered after every rank agreed) holds the weights of STEPS steps, next to a
sharded state. The tests compare against it:

- two nodes: the same FSDP run under two agents, one node's worker sent SIGTERM mid-run (model file + sharded
  state), resumed by two agents to STEPS: the reference's weights and EMA, bit for bit;
- DDP: the same run under DDP gives the reference's weights and EMA up to fp32 rounding;
- the reference's 2-process crash state resumed by one process without FSDP: the full weights, EMA and optimizer
  state it writes equal the sharded state's contents exactly; a rank missing from a crash save is waited for
  (bounded), then one line.
"""
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from helpers import ENV, ROOT, TORCHRUN, run_ok, run_workers

STEPS = 4
NAMES = ("demo.safetensors", "demo-ema.safetensors")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_agents(args, on_start=None, timeout=300):
    """Two torchrun agents, one worker each, meeting at a c10d rendezvous on 127.0.0.1: two 'nodes' on one machine.
    `on_start(agents)` runs while they train. Both must exit 0."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=s{port}", *map(str, args)]
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    try:
        if on_start is not None:
            on_start(agents)
        outs = [a.communicate(timeout=timeout)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    for a, out in zip(agents, outs):
        assert a.returncode == 0, f"agent exited {a.returncode}:\n{out[-6000:]}"
    return "\n".join(outs)


def _worker_of(agent, script):
    """The process a torchrun agent started to run `script` (found by its command line among the agent's
    descendants: the agent may start helpers too)."""
    todo = [agent.pid]
    while todo:
        pid = todo.pop()
        try:
            if pid != agent.pid and script in open(f"/proc/{pid}/cmdline").read().split("\0"):
                return pid
            todo += [int(k) for k in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        except OSError:  # gone meanwhile
            pass
    raise AssertionError(f"the agent runs no {script}")


def _sigterm_after_first_step(out_dir):
    def go(agents):
        metrics = os.path.join(out_dir, "logs", "metrics.jsonl")
        deadline = time.time() + 180
        while time.time() < deadline:  # step 1 is logged: the signal handlers are in place, the run is under way
            if os.path.isfile(metrics) and open(metrics).read().strip():
                break
            time.sleep(0.01)
        os.kill(_worker_of(agents[1], "train.py"), signal.SIGTERM)
    return go


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _models(out):
    return {name: load_file(str(out / "models" / name)) for name in NAMES}


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """(folder, common args, fsdp args): the data cached by two agents; the reference FSDP run in folder/fsdp."""
    pytest.importorskip("torch.distributed.fsdp").fully_shard  # FSDP2 API
    from data.demo import make_demo_dataset
    tmp = tmp_path_factory.mktemp("fsdp")
    make_demo_dataset(str(tmp / "data"), n=4, size=(64, 64))
    common = ["configs/demo.toml", "model.model_preset=micro", f"data.image_dirs=['{tmp / 'data'}']",
              f"cache.cache_dir={tmp / 'cache'}", "data.resolution=64", "data.min_bucket_reso=64",
              "data.max_bucket_reso=64", "data.batch_size=1", f"train.max_train_steps={STEPS}",
              "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0",
              "save.save_every_n_steps=0", "save.save_state=false", "train.use_ema=true", "train.ema_decay=0.5",
              # SGD: the update is linear in the gradient, so reduction-order rounding stays rounding (Adam's
              # normalisation turns it into sign flips on parameters whose gradient is ~0)
              "optimizer.optimizer_type=SGD", "optimizer.learning_rate=0.05", "optimizer.optimizer_kwargs={momentum=0.9}"]
    fsdp = [*common, "train.fsdp=true"]
    out = _two_agents(["cache.py", *common])
    assert "encoded 4" in out
    # the reference: STEPS steps, previews (FSDP: every rank runs every prompt, the sharded EMA swapped in), then an
    # exception on both ranks before step STEPS + 1
    env = {**ENV, "SDTRAIN_CRASH_WAIT_S": "60"}
    out = run_ok(TORCHRUN + ["tests/fault_entry.py", f"raise_at_step={STEPS}", *fsdp, f"output_dir={tmp / 'fsdp'}", f"train.max_train_steps={STEPS + 1}",
                             f"sample.sample_every_n_steps={STEPS}", "sample.sample_params={width=64, height=64, steps=1}"],
                 env=env, expect=1)
    assert f"injected test fault at step {STEPS}" in out.stderr
    return tmp, common, fsdp


def _reference(tmp):
    return {name: load_file(str(tmp / "fsdp" / "models" / name.replace("demo", "demo-crashed"))) for name in NAMES}


@pytest.mark.slow
def test_two_nodes_sigterm_and_resume_match_one_node_bit_for_bit(ref):
    tmp, _, fsdp = ref
    # two nodes: SIGTERM to the second node's worker mid-run: a model file and a sharded state, written by both
    nodes = tmp / "nodes"
    out = _two_agents(["train.py", *fsdp, f"output_dir={nodes}"], on_start=_sigterm_after_first_step(str(nodes)))
    assert "stop requested" in out
    stopped = [int(n[5:]) for n in os.listdir(nodes / "state") if n.startswith("step-")]
    assert stopped and max(stopped) < STEPS, f"the run ended before the signal arrived: {stopped}"
    state = nodes / "state" / f"step-{max(stopped):08d}"
    manifest = json.load(open(state / "COMPLETE"))  # one shard file per rank + the layout, each with its checksum
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "rng-rank0.pt", "rng-rank1.pt",
            "progress.json"} <= set(manifest)
    assert not (state / "trained.safetensors").exists()
    import models
    assert models.load(str(nodes / "models" / "demo-interrupted.safetensors"), parts=("unet",)).unet is not None
    # resumed by two agents (a 2-process state with 2 processes): the single-agent run's weights and EMA exactly
    out = _two_agents(["train.py", *fsdp, f"output_dir={nodes}", "train.resume=auto"])
    assert f"resumed from {state}" in out
    want, got = _reference(tmp), _models(nodes)
    for name in NAMES:
        assert _same(want[name], got[name]), name
    assert not _same(want[NAMES[0]], want[NAMES[1]])  # the EMA is not the model


@pytest.mark.slow
def test_fsdp_ema_matches_ddp_crash_export_and_one_process_resume(ref, tmp_path):
    tmp, common, _ = ref
    assert os.path.isfile(tmp / "fsdp" / "samples" / f"{STEPS:06d}_grid.png")  # previews under FSDP
    import models
    assert models.load(str(tmp / "fsdp" / "models" / "demo-crashed.safetensors"), parts=("unet",)).unet is not None
    run_workers(["train.py", *common, f"output_dir={tmp_path / 'ddp'}"])  # 2 processes, no agent needed
    ddp, fs = _models(tmp_path / "ddp"), _reference(tmp)
    for name in NAMES:  # same data and noise: equal up to the order of floating-point reductions
        assert ddp[name].keys() == fs[name].keys()
        for k in ddp[name]:
            assert torch.allclose(ddp[name][k].float(), fs[name][k].float(), rtol=1e-4, atol=1e-6), (name, k)

    # the crash state: sharded, intact; resumed by one process without FSDP (it ends at once, writes a full state)
    state = tmp / "fsdp" / "state" / f"step-{STEPS:08d}"
    from training import resume as rstate
    assert rstate.verify_state(str(state)) is None and (state / "dcp" / "__1_0.distcp").is_file()
    import train
    from core import dist
    one = tmp_path / "one"
    os.makedirs(one / "state")
    shutil.copytree(state, one / "state" / state.name)
    try:
        assert train.main([*common, f"output_dir={one}", f"train.resume={one / 'state' / state.name}",
                           "save.save_state=true"]) == 0
    finally:
        dist.shutdown()
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(str(state / "dcp"), str(tmp_path / "full.pt"))
    full = torch.load(str(tmp_path / "full.pt"), weights_only=False)
    got = one / "state" / state.name
    assert _same(load_file(str(got / "trained.safetensors")), full["model"])
    assert _same(load_file(str(got / "ema.safetensors")), full["ema"])
    opt = torch.load(str(got / "optimizer.pt"), weights_only=True)
    names = full["optimizer"]["param_groups"][0]["params"]  # parameter names in the group's order
    assert len(names) == len(opt["param_groups"][0]["params"]) == len(full["model"])
    for i, name in zip(opt["param_groups"][0]["params"], names):
        assert torch.equal(opt["state"][i]["momentum_buffer"], full["optimizer"]["state"][name]["momentum_buffer"])


def test_crash_save_under_fsdp_waits_for_every_rank_bounded(tmp_path, caplog):
    from training import crash
    log = logging.getLogger("test_fsdp")
    wrote = []
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR, "test_fsdp"):  # rank 1 never arrives: nothing written, one line, bounded
        assert not crash.all_crashed(str(tmp_path), "tok", 0, 2, log, lambda: wrote.append(0), wait_s=0.3)
    assert time.monotonic() - t0 < 5 and not wrote
    assert len(caplog.records) == 1 and "rank(s) [1] did not reach the crash save" in caplog.text
    open(tmp_path / ".crash-tok.rank1", "w").close()  # rank 1 crashed too: both write together
    assert crash.all_crashed(str(tmp_path), "tok", 0, 2, log, lambda: wrote.append(1), wait_s=0.3)
    assert wrote == [1]


@pytest.mark.slow
def test_lora_under_fsdp_state_holds_adapters_only_and_resumes_exactly(ref, tmp_path):
    """LoRA with FSDP (one plain process: its own group of one): the adapters are the trainable set, so the sharded
    state holds adapters, their optimizer state and EMA, never the frozen base; resuming it is exact."""
    tmp, _, fsdp = ref
    import train
    from core import dist
    import torch.distributed.checkpoint as dcp
    args = [*fsdp, "network.network_module=lora", "network.network_dim=4", "train.max_train_steps=2",
            "save.save_every_n_steps=1", "save.save_state=true"]
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        assert train.main([*args, f"output_dir={a}"]) == 0
        dist.shutdown()
        state = a / "state" / "step-00000001"
        keys = list(dcp.FileSystemReader(str(state / "dcp")).read_metadata().state_dict_metadata)
        assert any(k.startswith("model.lora.") for k in keys) and any(k.startswith("ema.") for k in keys)
        assert not [k for k in keys if k.startswith("model.") and not k.startswith("model.lora.")]
        assert train.main([*args, f"output_dir={b}", f"train.resume={state}"]) == 0
    finally:
        dist.shutdown()
    for name in NAMES:
        fa, fb = load_file(str(a / "models" / name)), load_file(str(b / "models" / name))
        assert any(k.startswith("lora_unet_") for k in fa) and _same(fa, fb), name


@pytest.mark.slow
def test_sharded_state_without_ema_resumed_with_ema_starts_it_from_the_resumed_weights(tmp_path):
    """Was: a sharded state saved with train.use_ema = false, resumed with it on, started the EMA from the weights
    before the resume (a full state's EMA starts from the resumed ones). The state is written by one FSDP process,
    resumed by 2 (run_workers) that stop at once: the EMA export equals the model export."""
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    from data.demo import make_demo_dataset
    import train
    from core import dist
    make_demo_dataset(str(tmp_path / "data"), n=2, size=(64, 64))
    args = ["configs/demo.toml", "model.model_preset=micro", f"data.image_dirs=['{tmp_path / 'data'}']",
            "cache.cache_dir=", "data.resolution=64", "data.min_bucket_reso=64", "data.max_bucket_reso=64",
            "data.batch_size=1", "train.max_train_steps=2", "optimizer.lr_warmup_steps=0",
            "optimizer.lr_scheduler=constant", "sample.sample_every_n_steps=0", "save.save_every_n_steps=0",
            "save.save_state=true", "train.fsdp=true", f"output_dir={tmp_path / 'run'}"]
    try:
        assert train.main(args) == 0
    finally:
        dist.shutdown()
    state = tmp_path / "run" / "state" / "step-00000002"
    assert (state / "dcp").is_dir() and not (tmp_path / "run" / "models" / "demo-ema.safetensors").exists()
    run_workers(["train.py", *args, "train.use_ema=true", f"train.resume={state}"])
    model, ema = _models(tmp_path / "run").values()
    assert _same(model, ema)
