"""Strict TOML config: unknown keys, types, ranges, inheritance, overrides, printing, hooks."""
import os
import textwrap

import pytest

from core.config import (Config, ConfigError, config_from_dict, format_output_dir, load_config,
                         reference_markdown, resolve_hook, to_toml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_unknown_key_names_file_table_and_suggestion(tmp_path):
    p = write(tmp_path, "a.toml", """
        [optimizer]
        learning_rte = 1e-4
    """)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert p in msg and "[optimizer]" in msg and "did you mean `learning_rate`" in msg


def test_unknown_table_and_nested_subset_key(tmp_path):
    p = write(tmp_path, "a.toml", "[optimiser]\nlearning_rate = 1\n")
    with pytest.raises(ConfigError, match="did you mean `optimizer`"):
        load_config(p)
    p = write(tmp_path, "b.toml", "[[data.subsets]]\nnum_repeat = 2\n")
    with pytest.raises(ConfigError, match=r"data\.subsets\[0\].*did you mean `num_repeats`"):
        load_config(p)


@pytest.mark.parametrize("text,needle", [
    ("[data]\nbatch_size = \"8\"\n", "expected an integer"),
    ("[data]\nbatch_size = 1.5\n", "expected an integer"),
    ("[train]\ngradient_checkpointing = 1\n", "expected a boolean"),
    ("[optimizer]\nlearning_rate = \"fast\"\n", "expected a number"),
    ("[data]\nimage_dirs = \"x\"\n", "expected array of string"),
])
def test_type_errors_say_allowed_type(tmp_path, text, needle):
    p = write(tmp_path, "a.toml", text)
    with pytest.raises(ConfigError, match=needle) as e:
        load_config(p)
    assert p in str(e.value)


@pytest.mark.parametrize("text,needle", [
    ("[data]\nbatch_size = -1\n", "must be >= 1"),
    ("[optimizer]\nlr_scheduler = \"cosine_annealing\"\n", "allowed values: .*'cosine'"),
    ("[train]\nmixed_precision = \"fp8\"\n", "allowed values"),
    ("[loss]\nmin_timestep = 500\nmax_timestep = 100\n", "must be smaller"),
    ("[train]\nfull_bf16 = true\nmixed_precision = \"fp16\"\n", "requires"),
    ("[data]\nresolution = 1020\n", "multiple of 8"),
    ("[optimizer]\nparam_groups = [{pattern = 'x', learning_rate = 1}]\n", "param_groups"),
    ("[save]\nsave_model_as = \"diffusers\"\n[network]\nnetwork_module = \"lora\"\n", "is for full fine-tunes"),
    ("[save]\nsave_model_as = \"ckpt\"\n", "allowed values: .*'diffusers'"),
])
def test_impossible_values(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, "a.toml", text))


def test_inheritance_and_overrides(tmp_path):
    os.makedirs(tmp_path / "sub")
    write(tmp_path, "base.toml", """
        seed = 1
        [data]
        batch_size = 4
        image_dirs = ["base_imgs"]
        [optimizer]
        learning_rate = 1e-5
        optimizer_kwargs = {weight_decay = 0.01, betas = [0.9, 0.99]}
    """)
    child = write(tmp_path, "sub/child.toml", """
        base = "../base.toml"
        [data]
        batch_size = 8
        [optimizer]
        optimizer_kwargs = {eps = 1e-8}
    """)
    cfg = load_config(child)
    assert cfg.seed == 1 and cfg.data.batch_size == 8 and cfg.data.image_dirs == ["base_imgs"]
    assert cfg.optimizer.learning_rate == 1e-5
    assert cfg.optimizer.optimizer_kwargs == {"eps": 1e-8}  # free-form tables are replaced whole
    cfg = load_config(child, ["optimizer.learning_rate=2e-6", "data.batch_size=3", "model.vae=my vae.safetensors",
                              "output_dir=123", "data.image_dirs=['a', 'b']"])
    assert cfg.optimizer.learning_rate == 2e-6 and cfg.data.batch_size == 3
    assert cfg.model.vae == "my vae.safetensors" and cfg.output_dir == "123"
    assert cfg.data.image_dirs == ["a", "b"]
    with pytest.raises(ConfigError, match="command line.*did you mean `learning_rate`"):
        load_config(child, ["optimizer.learning_rat=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(child, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="table.key=value"):
        load_config(child, ["data.batch_size"])


def test_circular_base(tmp_path):
    write(tmp_path, "a.toml", 'base = "b.toml"\n')
    write(tmp_path, "b.toml", 'base = "a.toml"\n')
    with pytest.raises(ConfigError, match="circular"):
        load_config(str(tmp_path / "a.toml"))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "bad.toml", "[data\n"))


def test_print_config_round_trips(tmp_path, capsys):
    p = write(tmp_path, "a.toml", """
        output_dir = "runs/{date}"
        [data]
        image_dirs = ["x \\"quoted\\" dir", "y"]
        caption_separator = "\\t"
        [[data.subsets]]
        image_dirs = ["s1"]
        num_repeats = 3
        shuffle_caption = true
        [[data.subsets]]
        metadata_files = ["m.json"]
        loss_weight = 0.5
        [optimizer]
        optimizer_kwargs = {weight_decay = 0.01, betas = [0.9, 0.99], "odd key" = "v"}
        param_groups = [{pattern = "input_blocks\\\\.0", lr = 1e-6}]
        [sample]
        sample_params = {steps = 20}
    """)
    cfg = load_config(p)
    text = to_toml(cfg)
    again = write(tmp_path, "b.toml", text)
    assert load_config(again) == cfg
    assert to_toml(load_config(again)) == text
    # the CLI flag prints the same TOML and exits 0
    import train
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # train.py's main in this process (the flag is parsed first thing)
        train.main([str(p), "--print-config"])
    out = capsys.readouterr()
    assert e.value.code == 0, out.err
    assert config_from_dict(__import__("tomllib").loads(out.out)) == cfg


def test_hooks(tmp_path):
    hook = write(tmp_path, "myhooks.py", "def proc(key, meta, **kw):\n    return key.upper()\n")
    fn = resolve_hook(f"{hook}:proc")
    assert fn("abc", {}) == "ABC"
    assert resolve_hook("os.path:join")("a", "b") == os.path.join("a", "b")
    with pytest.raises(ConfigError, match="no attribute `nope`"):
        resolve_hook(f"{hook}:nope")
    with pytest.raises(ConfigError, match="file not found"):
        resolve_hook(str(tmp_path / "missing.py") + ":f")
    with pytest.raises(ConfigError, match="cannot import module"):
        resolve_hook("no_such_pkg_xyz.mod:f")
    with pytest.raises(ConfigError, match="must look like"):
        resolve_hook("just_a_name")
    with pytest.raises(ConfigError, match="must look like"):
        config_from_dict({"data": {"caption_processor": "no_colon"}})


def test_output_dir_format_and_reference():
    import datetime
    now = datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert format_output_dir("runs/{date}_{time}", now) == "runs/20260102_030405"
    with pytest.raises(ConfigError, match="only \\{date\\}"):
        format_output_dir("runs/{user}", now)
    ref = reference_markdown()
    for name in ("learning_rate", "bucket_reso_step", "min_snr_gamma", "save_every_n_steps", "[[data.subsets]]"):
        assert name in ref
    assert Config().data.bucket_reso_step == 64


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".toml")))
def test_shipped_configs_are_valid(name):
    load_config(os.path.join(ROOT, "configs", name))
