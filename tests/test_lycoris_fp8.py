"""LoHa / LoKr / DoRA on an fp8 base (`model.fp8_base`, training/fp8.py) through train.py in process: the frozen base
is stored as e4m3 codes and upcast per layer at use, and these adapters build their dW against that upcast weight
(DoRA also takes its norm), so they train as LoRA does there. Two 2-step runs on the tiny SDXL preset, text encoders
trained (their fp8 linears and bigG's fused q / k / v projection, which stays in its dtype): LoHa + DoRA, and LoKr."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import demo_data_and_tiny_base, main_ok

RUNS = {"loha+dora": ["network.network_module=loha", "network.dora_wd=true"],
        "lokr": ["network.network_module=lokr", "network.factor=4"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data_and_tiny_base(tmp_path_factory.mktemp("lycoris_fp8"), n=2, size=(64, 64))


@pytest.mark.parametrize("name", list(RUNS))
def test_lycoris_trains_on_fp8_base(data, tmp_path, name):
    out = tmp_path / "out"
    log = main_ok("train", [
        "configs/demo.toml", f"data.image_dirs=['{data / 'data'}']", "cache.cache_dir=", f"output_dir={out}",
        f"model.pretrained_model_name_or_path={data / 'base.safetensors'}", "model.model_preset=",
        "model.fp8_base=true", "train.max_train_steps=2", "optimizer.lr_warmup_steps=0",
        "sample.sample_every_n_steps=0", "save.save_every_n_steps=0", "data.batch_size=1", "data.resolution=64",
        "save.save_precision=fp32", "network.network_dim=4", *RUNS[name]], log_dir=out / "logs")
    assert "fp8 base (e4m3" in log and "of unet, te1, te2" in log
    sd = load_file(str(out / "models" / "demo.safetensors"))
    # the zero-initialised halves moved: gradients reached them through the upcast fp8 weights, in every part
    zero_init = ("hada_w2_a",) if name.startswith("loha") else ("lokr_w2_b", "lokr_w2")
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        moved = [k for k, v in sd.items() if k.startswith(prefix) and k.rsplit(".", 1)[-1].endswith(zero_init)
                 and torch.count_nonzero(v) > 0]
        assert moved, (prefix, sorted(sd)[:4])
    assert all(torch.isfinite(v).all() for v in sd.values())
    if "dora" in name:
        assert any(k.endswith(".dora_scale") for k in sd)
