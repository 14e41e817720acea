"""Issue #25 item 16: seed options of the tools users come from, as those tools define them: HCP-Diffusion's
`_base_` list of files, `lr_scheduler_kwargs`, euge-trainer's `sample_benchmark` with `sample_name`, per-subset
resolution / batch size (kohya's [[datasets]]) and bucket settings (HCP's fixed bucket / num_bucket)."""

import pytest

from core.config import ConfigError, load_config


def _w(path, text):
    path.write_text(text)
    return str(path)


# ---- HCP-Diffusion `_base_`: a list of files ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["base", "_base_"])
def test_base_list_merges_as_hcp(tmp_path, key):
    """hcpdiff/utils/utils.py load_config: `for base in cfg['_base_']: cfg = merge(load_config(base), cfg)`: each
    base goes under what came before, so the file wins, then its first base, then the second; bases chain."""
    _w(tmp_path / "root.toml", "seed = 1\n[optimizer]\nlearning_rate = 0.1\nlr_warmup_steps = 7\n")
    _w(tmp_path / "b.toml", "base = \"root.toml\"\nseed = 2\n[optimizer]\nlearning_rate = 0.2\n[train]\nmax_train_steps = 5\n")
    _w(tmp_path / "a.toml", "seed = 3\n[train]\nmax_train_steps = 9\ngradient_accumulation_steps = 2\n")
    cfg = load_config(_w(tmp_path / "run.toml", f"{key} = [\"a.toml\", \"b.toml\"]\n[train]\ngradient_accumulation_steps = 4\n"))
    assert cfg.seed == 3                                   # a over b over root
    assert cfg.optimizer.learning_rate == 0.2 and cfg.optimizer.lr_warmup_steps == 7  # b over root; root's own
    assert cfg.train.max_train_steps == 9 and cfg.train.gradient_accumulation_steps == 4  # a over b; the file over a
    with pytest.raises(ConfigError, match="base file not found"):
        load_config(_w(tmp_path / "bad.toml", f"{key} = [\"a.toml\", \"nope.toml\"]\n"))
    with pytest.raises(ConfigError, match="a file name or a list of file names"):
        load_config(_w(tmp_path / "bad2.toml", f"{key} = [1]\n"))
    with pytest.raises(ConfigError, match="both `base` and `_base_`"):
        load_config(_w(tmp_path / "bad3.toml", "base = \"a.toml\"\n_base_ = [\"b.toml\"]\n"))
    with pytest.raises(ConfigError, match="circular base chain"):
        load_config(_w(tmp_path / "loop.toml", f"{key} = [\"a.toml\", \"loop.toml\"]\n"))


# ---- lr_scheduler_kwargs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kwargs, fn", [
    ("cosine", {"num_cycles": 1.5}, "get_cosine_schedule_with_warmup"),
    ("cosine", {}, "get_cosine_schedule_with_warmup"),
    ("polynomial", {"lr_end": 1e-4}, "get_polynomial_decay_schedule_with_warmup"),
])
def test_lr_scheduler_kwargs_as_diffusers_takes_them(name, kwargs, fn):
    """euge-trainer's lr_scheduler_kwargs / kohya's --lr_scheduler_args are passed as **kwargs to the diffusers
    schedule function (kohya train_util.get_scheduler_fix, euge sdxl_train_utils.get_scheduler_fix); the curve
    equals diffusers' with the same arguments at every step. (The key was unknown.)"""
    import torch
    diffusers_opt = pytest.importorskip("diffusers.optimization")

    from core.config import OptimizerConfig
    from training.optim import build_scheduler

    cfg = OptimizerConfig(lr_scheduler=name, lr_warmup_steps=3, lr_scheduler_kwargs=kwargs, lr_scheduler_power=2.0)
    total = 40
    ours = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2), cfg, total)
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    extra = {"power": 2.0} if name == "polynomial" else {}
    ref = getattr(diffusers_opt, fn)(ref_opt, num_warmup_steps=3, num_training_steps=total, **extra, **kwargs)
    for _ in range(total + 2):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12, abs=1e-15)
        ours.optimizer.step(); ours.step(); ref_opt.step(); ref.step()


def test_lr_scheduler_kwargs_refused_where_the_schedule_takes_none(tmp_path):
    import torch

    from core.config import OptimizerConfig
    from training.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    with pytest.raises(ValueError, match="'linear' takes no 'num_cycles'"):
        build_scheduler(opt, OptimizerConfig(lr_scheduler="linear", lr_scheduler_kwargs={"num_cycles": 2}), 10)
    with pytest.raises(ValueError, match="must be a finite number"):
        build_scheduler(opt, OptimizerConfig(lr_scheduler="cosine", lr_scheduler_kwargs={"num_cycles": "x"}), 10)
    cfg = load_config(_w(tmp_path / "c.toml", "[optimizer]\nlr_scheduler = \"cosine\"\nlr_scheduler_kwargs = {num_cycles = 1.0}\n"))
    assert cfg.optimizer.lr_scheduler_kwargs == {"num_cycles": 1.0}
