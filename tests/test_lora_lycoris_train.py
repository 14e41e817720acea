"""LoKr and DoRA trained by train.py end to end (issue #27): 20 steps on the demo data in 2-process DDP (gloo), text-encoder
adapters on, a resumed run from the step-16 state writing the same file bit for bit, the loss on a fixed evaluation
(the training images, fixed noise and timesteps, the product's objective) lower with the trained file merged than
without, and the base weights untouched by training (an in-process run compares every base tensor before / after).
"""
import glob
import shutil

import pytest
import torch
from safetensors.torch import load_file

import models
from helpers import demo_data_and_tiny_base, run_workers

pytestmark = pytest.mark.slow

ALGOS = {"lokr": ["network.network_module=lokr", "network.factor=4"],
         "dora": ["network.network_module=lora", "network.dora_wd=true"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data_and_tiny_base(tmp_path_factory.mktemp("lycoris"), n=8, size=(64, 64))


def _args(root, out, *extra):
    return ["configs/demo.toml", f"data.image_dirs=['{root / 'data'}']", "cache.cache_dir=", f"output_dir={out}",
            f"model.pretrained_model_name_or_path={root / 'base.safetensors'}", "train.max_train_steps=20",
            "optimizer.lr_warmup_steps=0", "optimizer.lr_scheduler=constant", "optimizer.learning_rate=2e-3",
            "sample.sample_every_n_steps=0", "save.save_every_n_steps=8", "data.batch_size=2",
            "save.save_precision=fp32", "network.network_dim=4", "network.network_alpha=4", *extra]


@torch.no_grad()
def _fixed_loss(root, lora_file=None):
    """Mean loss over the 8 training images x 4 draws of (timestep, noise) from a fixed generator, through train.py's
    Trainee (text encoded, SDXL conditioning) and objective, with the LoRA file merged into the base or without."""
    import numpy as np
    from PIL import Image

    from training import trainable
    from core.config import config_from_dict
    from diffusion.objectives import build_objective
    from networks import lora
    comp = models.load(str(root / "base.safetensors"))
    if lora_file is not None:
        lora.merge_into(comp, lora.read_lora(str(lora_file), comp))
    for m in comp.parts().values():
        m.eval()
    paths = sorted(glob.glob(str(root / "data" / "*.png")))
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                        for p in paths]) / 127.5 - 1
    caps = [open(p[:-4] + ".txt").read() for p in paths]
    x0 = comp.encode_images(imgs)
    objective = build_objective(models.family("sdxl").objective, config_from_dict({}).loss)
    trainee = trainable.Trainee(comp, train_text_encoder=False)
    g = torch.Generator().manual_seed(123)
    sizes = tuple(torch.tensor([[64.0, 64.0]] * len(paths)) if i != 1 else torch.zeros(len(paths), 2) for i in range(3))
    losses = []
    for _ in range(4):
        nb = objective.noise(x0, g)
        losses.append(objective.loss(trainee(nb.x_t, nb.t, None, caps, sizes).float(), nb).mean())
    return float(torch.stack(losses).mean())


def _run_and_resume(root, algo):
    out, res = root / algo / "run", root / algo / "resumed"
    run_workers(["train.py", *_args(root, out, *ALGOS[algo])])
    state = out / "state" / "step-00000016"  # a late state: the resumed run's 4 steps are what the check needs
    (res / "state").mkdir(parents=True)
    shutil.copytree(state, res / "state" / state.name)
    run_workers(["train.py", *_args(root, res, *ALGOS[algo], f"train.resume={res / 'state' / state.name}")])
    return out, res


@pytest.fixture(scope="module")
def runs(data):
    """Both algorithms' run + resumed run, the two algorithms at once (each is mostly process start-up)."""
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(len(ALGOS)) as pool:
        futures = {a: pool.submit(_run_and_resume, data, a) for a in ALGOS}
        return {a: f.result() for a, f in futures.items()}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_ddp_run_learns_and_resumes_exactly(data, runs, algo):
    out, res = runs[algo]
    a, b = load_file(str(out / "models" / "demo.safetensors")), load_file(str(res / "models" / "demo.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]
    leaves = {k.split(".", 1)[1] for k in a}
    if algo == "lokr":
        assert {"lokr_w1", "alpha"} <= leaves and any(k.startswith("lokr_w2") for k in leaves)
        assert any(k.startswith("lora_te1_") for k in a) and any("in_layers_2" in k for k in a)  # convs (LyCORIS)
    else:
        assert {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"} == leaves
    from safetensors import safe_open
    with safe_open(str(out / "models" / "demo.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    import json
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("lokr" if algo == "lokr" else "lora") and (algo != "dora" or args["dora_wd"] == "True")
    before, after = _fixed_loss(data), _fixed_loss(data, out / "models" / "demo.safetensors")
    assert after < 0.97 * before, (before, after)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_lycoris_training_leaves_the_base_untouched(data, algo, tmp_path):
    """In process: every base tensor of the loaded model bit-identical after 3 training steps (DoRA renormalises W + dW
    on the fly and must never write W)."""
    from training import trainable
    from core.config import load_config
    cfg = load_config("configs/demo.toml", _args(data, tmp_path / "x", *ALGOS[algo])[1:])
    comp = models.load(str(data / "base.safetensors"))
    before = {k: v.clone() for k, v in comp.prefixed_state_dict().items()}
    run = trainable.make_trainable(cfg, comp, torch.device("cpu"), print)
    opt = torch.optim.AdamW([p for g in run.param_groups(cfg.optimizer) for p in g["params"]], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(2, 4, 8, 8, generator=g)
        sizes = tuple(torch.tensor([[64.0, 64.0]] * 2) for _ in range(3))
        run.trainee(x, torch.tensor([300.0, 700.0]), None, ["a red circle", "a blue square"], sizes).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert any(a.abs().sum() > 0 for n, a in run.network.kohya_state_dict().items() if "w2" in n or "lora_up" in n)
    after = comp.prefixed_state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_lokr_with_dora_under_fsdp_matches_ddp(data, tmp_path):
    """FSDP2 (adapters in the root unit, the base sharded per block) gives the DDP run's file up to reduction-order
    rounding: LoKr with DoRA, whose forward reads the base weight of the layer it adapts (unsharded in its block's
    forward). SGD, linear in the gradient, so the rounding stays rounding (as tests/test_lora_train.py)."""
    import concurrent.futures
    pytest.importorskip("torch.distributed.fsdp").fully_shard
    common = [*ALGOS["lokr"], "network.dora_wd=true", "train.max_train_steps=2", "save.save_every_n_steps=0",
              "optimizer.optimizer_type=SGD", "optimizer.learning_rate=0.5"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_workers, ["train.py", *_args(data, tmp_path / name, *common, *extra)])
                for name, extra in (("ddp", []), ("fsdp", ["train.fsdp=true"]))]
        for j in jobs:
            j.result()
    ddp, fsdp = (load_file(str(tmp_path / n / "models" / "demo.safetensors")) for n in ("ddp", "fsdp"))
    assert ddp.keys() == fsdp.keys() and any(k.endswith("dora_scale") for k in ddp)
    for k in ddp:
        assert torch.allclose(ddp[k], fsdp[k], rtol=1e-4, atol=1e-6), (k, (ddp[k] - fsdp[k]).abs().max())
    init = {k: v for k, v in ddp.items() if k.endswith("lokr_w2") or k.endswith("lokr_w2_b")}
    assert any(v.abs().sum() > 0 for v in init.values())  # trained off their zero init
