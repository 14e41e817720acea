"""Every shipped config a user starts from (configs/*.toml but the tests' tiny presets) as a user launches it:
`torchrun --nproc_per_node=2 cache.py cfg.toml`, then `torchrun --nproc_per_node=2 train.py cfg.toml` (and
configs/sd3_lora.toml with 1 process too; tests/test_lora_launch.py runs configs/sdxl_lora.toml with 1 process and
FSDP), for 2 steps at tiny size. The overrides only shrink the run: the model files become tiny files of the same kind (a checkpoint, and the
separate VAE / CLIP-L / CLIP-G / T5 files where the config names them), the data one tiny shared dataset (the
config's subsets kept with their class tokens, repeats and regularisation flags), 64 px buckets, 2 steps (warm-up
within them), 64 px previews of 2 steps, at most 1 loader worker. Nothing that decides which code runs is changed:
optimizer (AdamW8bit included), precision (bf16 / full_bf16), gradient checkpointing, LoRA with its text-encoder
adapters, block-wise ranks and rates, cached text-encoder outputs, FSDP where the config sets it. The cases run two at
once (one per core); each ends with the exported file checked."""
import concurrent.futures
import glob
import os
import subprocess
import sys
import time

import pytest
from safetensors import safe_open

import models
from core.config import _load_with_bases  # the config as its user's file says (base chain merged)
from helpers import ENV, ROOT

# The tests' tiny presets (random weights, no files; the bases of the demo's shapes_*.toml): most tests run them.
TEST_PRESETS = ("configs/demo.toml", "configs/demo_sd3.toml")
CONFIGS = sorted(c for c in (os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "*.toml")))
                 if c not in TEST_PRESETS)
ONE_PROCESS = ("configs/sd3_lora.toml",)  # its header launches it as one process
CASES = [(c, 2) for c in CONFIGS] + [(c, 1) for c in ONE_PROCESS]
STEPS = 2
SIZE = 64


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One tiny dataset (2 folders, for configs with 2 subsets) and tiny model files of each kind a config can name."""
    from safetensors.torch import save_file

    from data.demo import make_demo_dataset
    root = tmp_path_factory.mktemp("configs")
    make_demo_dataset(str(root / "data_a"), n=8, size=(64, 96), seed=0)
    make_demo_dataset(str(root / "data_b"), n=8, size=(64, 96), seed=1)
    out = {"data": [str(root / "data_a"), str(root / "data_b")]}
    for family in ("sdxl", "sd3"):
        comp = models.build(family, "tiny", seed=0)
        out[f"{family}_ckpt"] = str(root / f"{family}.safetensors")
        models.save(comp, out[f"{family}_ckpt"], "fp32")
        out[f"{family}_vae"] = os.path.join(ROOT, "models", "assets", f"tiny_vae_{family}.safetensors")
    sd = models.build("sd3", "tiny", seed=0).export_state_dict()
    for name, prefix in (("clip_l", "text_encoders.clip_l.transformer."), ("clip_g", "text_encoders.clip_g.transformer."),
                         ("t5xxl", "text_encoders.t5xxl.transformer.")):  # ComfyUI's separate files: no prefix
        out[name] = str(root / f"{name}.safetensors")
        part = {k[len(prefix):]: v.clone().contiguous() for k, v in sd.items() if k.startswith(prefix)}
        part.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight (one copy in the file)
        save_file(part, out[name])
    return out


def _toml(v) -> str:
    from core.config import _toml_value
    return _toml_value(v)


def shrink(config: str, files: dict, work: str) -> list[str]:
    """The overrides that make `config` a 2-step tiny run in `work`: model files, data, sizes, steps; nothing else."""
    raw = _load_with_bases(os.path.join(ROOT, config))
    model, data = raw.get("model", {}), raw.get("data", {})
    family = model.get("model_family") or _family_of(model.get("pretrained_model_name_or_path", ""))
    o = [f"output_dir={work}/run", f"cache.cache_dir={work}/cache"]
    if model.get("pretrained_model_name_or_path"):
        o.append(f"model.pretrained_model_name_or_path={files[f'{family}_ckpt']}")
    for part in ("vae", "clip_l", "clip_g", "t5xxl"):
        if model.get(part):
            o.append(f"model.{part}={files[f'{family}_vae'] if part == 'vae' else files[part]}")
    subsets = data.get("subsets", [])
    if subsets:
        o.append("data.subsets=" + _toml([{**s, "image_dirs": [files["data"][i % 2]]} for i, s in enumerate(subsets)]))
    else:
        o.append(f"data.image_dirs={_toml([files['data'][0]])}")
    o += [f"data.resolution={SIZE}", f"data.min_bucket_reso={SIZE}", f"data.max_bucket_reso={2 * SIZE}",
          "data.metadata_files=[]", f"data.max_dataloader_n_workers={min(data.get('max_dataloader_n_workers', 0), 1)}",
          f"cache.num_workers={min(raw.get('cache', {}).get('num_workers', 0), 1)}",
          f"train.max_train_steps={STEPS}",
          f"optimizer.lr_warmup_steps={min(raw.get('optimizer', {}).get('lr_warmup_steps', 0), STEPS - 1)}"]
    params = raw.get("sample", {}).get("sample_params")
    if params:
        o.append("sample.sample_params=" + _toml({**params, "width": SIZE, "height": SIZE, "steps": 2}))
    return o


def _family_of(path: str) -> str:
    """The family a shipped config's checkpoint name says (sd3 / sd3.5 files vs SDXL ones)."""
    return "sd3" if "sd3" in os.path.basename(path) else "sdxl"


def run_case(config: str, nproc: int, files: dict, work: str) -> dict:
    """cache.py then train.py under torchrun; returns the outputs and exit codes (asserted by the test)."""
    os.makedirs(work, exist_ok=True)
    overrides = shrink(config, files, work)
    result = {"work": work, "overrides": overrides}
    for script in ("cache.py", "train.py"):
        t0 = time.perf_counter()
        p = subprocess.run([*_torchrun(nproc), script, config, *overrides], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
        result[script] = (p.returncode, p.stdout[-3000:] + "\n" + p.stderr[-6000:])
        print(f"{config} {nproc} processes: {script} {time.perf_counter() - t0:.1f} s")
        if p.returncode:
            break
    return result


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """All cases, two at once (each torchrun case mostly waits on interpreter start-up and one core's work)."""
    root = tmp_path_factory.mktemp("config_runs")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {(c, n): pool.submit(run_case, c, n, files, str(root / f"{os.path.basename(c)[:-5]}_{n}"))
                   for c, n in CASES}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize("config,nproc", CASES, ids=[f"{os.path.basename(c)[:-5]}-{n}proc" for c, n in CASES])
def test_shipped_config_runs_under_torchrun(config, nproc, runs):
    r = runs[(config, nproc)]
    for script in ("cache.py", "train.py"):
        code, out = r.get(script, (None, "not run"))
        assert code == 0, f"torchrun --nproc_per_node={nproc} {script} {config} {' '.join(r['overrides'])}\nexited {code}:\n{out}"
    exported = glob.glob(os.path.join(r["work"], "run", "models", "*.safetensors"))
    assert exported, os.listdir(os.path.join(r["work"], "run"))
    raw = _load_with_bases(os.path.join(ROOT, config))
    net = raw.get("network", {})
    with safe_open(sorted(exported)[-1], "pt") as f:
        keys = list(f.keys())
    if net.get("network_module"):  # a kohya LoRA file with the adapters the config asks for
        assert any(k.startswith("lora_unet_") for k in keys), keys[:5]
        te = any(k.startswith("lora_te") for k in keys)
        assert te == (not net.get("network_train_unet_only", False)), keys[:5]
