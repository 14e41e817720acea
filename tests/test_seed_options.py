"""Issue #25 item 16: seed options of the tools users come from, as those tools define them: HCP-Diffusion's
`_base_` list of files, `lr_scheduler_kwargs`, euge-trainer's `sample_benchmark` with `sample_name`, per-subset
resolution / batch size (kohya's [[datasets]]) and bucket settings (HCP's fixed bucket / num_bucket)."""

import os

import numpy as np
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


# ---- kohya [[datasets]]: a resolution and a batch size per dataset (one run, several resolutions) -----------------

MULTIRES = """base = "{demo}"
output_dir = "{out}"
[data]
image_dirs = []
resolution = 64
bucket_reso_step = 32
min_bucket_reso = 32
max_bucket_reso = 256
batch_size = 2
[[data.subsets]]
image_dirs = ["{a}"]
[[data.subsets]]
image_dirs = ["{b}"]
resolution = 128
batch_size = 3
[cache]
cache_dir = ""
[train]
max_train_steps = {steps}
[optimizer]
lr_warmup_steps = 0
lr_scheduler = "constant"
[sample]
sample_every_n_steps = 0
[save]
save_every_n_steps = {every}
save_precision = "fp32"
"""


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Subset a: 6 images trained at 64 px in batches of 2; subset b: 5 images at 128 px in batches of 3."""
    import os

    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("multires")
    make_demo_dataset(str(root / "a"), n=6, size=(64, 64))
    make_demo_dataset(str(root / "b"), n=5, size=(128, 128))
    for f in os.listdir(root / "b"):  # keys are file stems: unique over the run
        os.rename(root / "b" / f, root / "b" / f"b_{f}")
    return root, os.path.abspath("configs/demo.toml")


def _multires_cfg(two_sets, out, steps=6, every=0):
    root, demo = two_sets
    path = out.parent / f"{out.name}.toml"
    path.write_text(MULTIRES.format(demo=demo, out=out, a=root / "a", b=root / "b", steps=steps, every=every))
    return str(path)


def test_subsets_bucket_at_their_resolution_and_batch_at_their_size(two_sets, tmp_path):
    """kohya config_util / train_util.DatasetGroup: each [[datasets]] entry has its own BucketManager (its
    resolution, its bucket options) and batch size, and a batch holds one dataset's images. Subset a's buckets are
    the 64 px buckets of its sizes, subset b's the 128 px ones; every batch is one subset's, of its batch size (a
    group's last one may be smaller), and the batch count per epoch is the sum of ceil(count / batch size)."""
    from core.config import load_config
    from data.buckets import BucketSettings, assign_buckets
    from data.index import build_index
    from data.loader import batches_per_epoch, make_loader

    cfg = load_config(_multires_cfg(two_sets, tmp_path / "x"))
    ix = build_index(cfg.data)
    for si, sub in enumerate(cfg.data.subsets):
        rows = np.flatnonzero(ix.subset == si)
        want = assign_buckets(ix.sizes[rows], BucketSettings.from_data_cfg(cfg.data, sub))
        assert np.array_equal(ix.buckets[rows], want)
    assert set(map(tuple, ix.buckets[ix.subset == 0].tolist())) == {(64, 64)}
    assert set(map(tuple, ix.buckets[ix.subset == 1].tolist())) == {(128, 128)}
    assert "subsets=[1:res=128" in ix.bucket_settings.key()  # the store's records follow each subset's bucketing
    batches = list(make_loader(ix, cfg.data, None, seed=0, epoch=0, rank=0, world_size=1))
    sizes = sorted((b["images"].shape[2], len(b["keys"])) for b in batches)
    assert sizes == [(64, 2)] * 3 + [(128, 2), (128, 3)]
    assert batches_per_epoch(ix, cfg.data, 1) == 5 and batches_per_epoch(ix, cfg.data, 2) == 3


def test_metadata_and_summary_give_each_datasets_batch_size_and_resolution(two_sets, tmp_path):
    """Was: ss_batch_size_per_device / ss_total_batch_size, ss_resolution and the summary's batch line gave [data]'s
    batch_size (2) and resolution when subsets have their own. kohya train_network.py (a --dataset_config run)
    writes no flat batch / resolution / bucket keys then: ss_datasets lists each dataset's batch_size_per_device,
    resolution, image counts, bucket_info and subsets."""
    import json

    import torch
    from data.index import build_index
    from training.run_metadata import training_metadata
    from training.summary import batch_line
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    def meta_of(cfg):
        ix = build_index(cfg.data)
        return ix, training_metadata(cfg, family="sdxl", index=ix, batches_per_epoch=5, world_size=2, num_epochs=1,
                                     optimizer=opt)
    cfg = load_config(_multires_cfg(two_sets, tmp_path / "x"))
    ix, meta = meta_of(cfg)
    assert not {"ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_bucket_info"} & set(meta)
    ds = json.loads(meta["ss_datasets"])
    assert [(d["batch_size_per_device"], d["resolution"], d["num_train_images"], d["is_dreambooth"]) for d in ds] == \
        [(2, [64, 64], 6, True), (3, [128, 128], 5, True)]
    assert [[(s["image_dir"], s["img_count"]) for s in d["subsets"]] for d in ds] == [[("a", 6)], [("b", 5)]]
    assert [sum(b["count"] for b in d["bucket_info"]["buckets"].values()) for d in ds] == [6, 5]
    assert batch_line(ix, cfg.data, 1, 2, torch.device("cpu")) == (
        "2 (subset 0 at 64x64), 3 (subset 1 at 128x128) per process x 1 accumulation x 2 process(es) on cpu = 4-6 "
        "images per optimizer step (a batch holds one of these)")
    # one dataset, with its own batch size and resolution: the flat keys, with its values
    cfg = load_config(_multires_cfg(two_sets, tmp_path / "y"), [
        f"data.subsets=[{{image_dirs=['{two_sets[0] / 'b'}'], batch_size=3, resolution=128}}]"])
    ix, meta = meta_of(cfg)
    assert "ss_datasets" not in meta and (meta["ss_batch_size_per_device"], meta["ss_total_batch_size"],
                                          meta["ss_resolution"]) == ("3", "6", "(128, 128)")
    assert batch_line(ix, cfg.data, 2, 2, torch.device("cpu")).startswith("3 per process x 2 accumulation x 2 "
                                                                           "process(es) on cpu = 12 images")


def test_multiresolution_ddp_run_resumes_bit_exactly(two_sets, tmp_path):
    """One 2-process DDP run (gloo) trains both subsets at their own resolutions and batch sizes for 4 steps; a run
    stopped at its step-2 state and resumed there ends with the same weights, bit for bit."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from helpers import run_workers

    straight = tmp_path / "straight"
    run_workers(["train.py", _multires_cfg(two_sets, straight, steps=4, every=2)])
    resumed = tmp_path / "resumed"
    (resumed / "state").mkdir(parents=True)
    shutil.copytree(straight / "state" / "step-00000002", resumed / "state" / "step-00000002")
    res = run_workers(["train.py", _multires_cfg(two_sets, resumed, steps=4),
                       f"train.resume={resumed / 'state' / 'step-00000002'}"])
    assert "resumed from" in res.stderr
    a = load_file(str(straight / "models" / "demo.safetensors"))
    b = load_file(str(resumed / "models" / "demo.safetensors"))
    mid = load_file(str(straight / "models" / "demo-step00000002.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # steps 3-4 trained something


# ---- euge-trainer sample_benchmark with sample_name ---------------------------------------------------------------

def test_sample_benchmark_entries_and_sample_name(tmp_path):
    """euge-trainer's sample_benchmark: a JSON list of {prompt, negative_prompt, steps, width, height, ...} entries
    (benchmarks/example_benchmark.json) whose `sample_name` names the images (modules/utils/eval_utils.py:
    `sample_name = param.pop("sample_name", DEFAULT_SAMPLE_NAME)`, `f"{sample_name}-{num_suffix}-{i}-{j}.png"`).
    The key was unknown in [sample] and in prompt files. Preview files carry the name; the config key is an alias
    of sample_prompts."""
    import json

    from diffusion.prompts import load_prompts

    bench = [{"prompt": "1girl, solo", "negative_prompt": "worst quality", "steps": 28, "width": 832, "height": 1216,
              "sample_name": "portrait"},
             {"prompt": "a girl surrounded by roses", "steps": 20, "width": 1344, "height": 704, "seed": 3,
              "sample_name": "roses / wide"},
             {"prompt": "no name", "steps": 4}]
    f = tmp_path / "example_benchmark.json"
    f.write_text(json.dumps(bench))
    ps = load_prompts(str(f))
    assert [p.name for p in ps] == ["portrait", "roses / wide", ""]
    assert (ps[0].width, ps[0].height, ps[0].negative_prompt) == (832, 1216, "worst quality")
    assert ps[1].file_name("000100") == "000100_1_3_roses_wide.png"
    assert ps[2].file_name("000100") == "000100_2_None.png"
    cfg = load_config(_w(tmp_path / "c.toml", f"[sample]\nsample_benchmark = \"{f}\"\nsample_every_n_steps = 5\n"))
    assert cfg.sample.sample_prompts == str(f)
    with pytest.raises(ConfigError, match="both set"):
        load_config(_w(tmp_path / "d.toml", f"[sample]\nsample_benchmark = \"{f}\"\nsample_prompts = \"x.txt\"\n"))


def test_preview_files_are_named_by_sample_name(tmp_path):
    """Through diffusion.preview.sample_round on the tiny SD3 preset: the preview of a named prompt is written as
    <step>_<index>_<seed>_<name>.png."""
    import torch

    import models
    from diffusion.preview import sample_round
    from diffusion.prompts import SamplePrompt

    comp = models.build("sd3", "tiny", seed=0)
    prompts = [SamplePrompt("a red circle", width=32, height=32, steps=2, seed=1, name="red"),
               SamplePrompt("a blue square", width=32, height=32, steps=2, seed=2, index=1)]
    written = sample_round(comp, prompts, str(tmp_path), 7, torch.device("cpu"))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["000007_0_1_red.png", "000007_1_2.png", "000007_grid.png"]


# ---- HCP-Diffusion num_bucket ------------------------------------------------------------------------------------

def hcp_bucket_sizes(centres_log2, target_area, step):
    """hcpdiff/data/bucket.py RatioBucket.build_buckets_from_images, after its KMeans: ratios = 2 ** centres,
    h = sqrt(area / ratio), w = h * ratio, both np.round(x / step) * step."""
    ratios = 2 ** np.asarray(centres_log2)
    h_all = np.sqrt(target_area / ratios)
    w_all = h_all * ratios
    return list(zip((np.round(w_all / step) * step).astype(int), (np.round(h_all / step) * step).astype(int)))


def test_num_bucket_clusters_ratios_as_hcp(tmp_path):
    """A subset with num_bucket = 3 over images of three clear aspect groups (plus jitter): three buckets, each at
    HCP's size for its cluster's mean log2 ratio, and every image in its own group's bucket. The clustering is a
    k-means fixed point: each image nearest its centre, each centre its images' mean."""
    from data.buckets import kmeans_1d
    from test_data_sources import data_cfg, img

    from core.config import SubsetConfig
    from data.index import build_index

    rng = np.random.default_rng(0)
    groups = {"wide": (192, 96), "square": (128, 128), "tall": (96, 192)}
    for name, (w, h) in groups.items():
        for i in range(5):
            img(tmp_path / "d" / f"{name}{i}.png", (w + int(rng.integers(-8, 9)), h + int(rng.integers(-8, 9))))
    cfg = data_cfg(resolution=128, bucket_reso_step=16, min_bucket_reso=32, max_bucket_reso=512, allow_empty_captions=True,
                   subsets=[SubsetConfig(image_dirs=[str(tmp_path / "d")], num_bucket=3)])
    ix = build_index(cfg)
    ratio = np.log2(ix.sizes[:, 0] / ix.sizes[:, 1])
    centres, label = kmeans_1d(ratio, 3)
    assert len(centres) == 3
    for j, c in enumerate(centres):  # a fixed point of Lloyd's iteration
        assert np.isclose(c, ratio[label == j].mean())
    assert np.array_equal(label, np.argmin(np.abs(ratio[:, None] - centres[None]), 1))
    want = hcp_bucket_sizes(centres, 128 * 128, 16)
    got = {ix.keys[i]: tuple(ix.buckets[i].tolist()) for i in range(len(ix))}
    for name in groups:
        assert len({got[f"{name}{i}"] for i in range(5)}) == 1  # a group shares one bucket
    assert sorted(set(got.values())) == sorted(map(tuple, want))
    assert got["square0"] == (128, 128) and got["wide0"][0] > got["wide0"][1] and got["tall0"][0] < got["tall0"][1]
