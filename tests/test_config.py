"""launch.config: shipped configs load, bad values are errors naming file and key, overrides, docs in sync."""

import dataclasses
import re
from pathlib import Path

import pytest

from launch import config as cfg_lib
from launch.config import ConfigError, load_config
from partitioned_fc import margins

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# The configs the Kubernetes manifests mount as /etc/pfc/config.yaml must load too.
K8S_CONFIGS = sorted((ROOT / "k8s").glob("**/config.yaml"))

MINIMAL = """
data:
  train: data/synth
  val: [sets/lfw.bin, sets/cfp_fp.bin]
model:
  backbone: tiny
train:
  steps: 100
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return str(path)


def test_every_shipped_config_loads():
    names = {p.name for p in CONFIGS}
    assert {"smoke.yaml", "ms1mv3_r50.yaml", "webface42m_r50_pfc02.yaml"} <= names
    assert len(K8S_CONFIGS) == 3, K8S_CONFIGS  # base, cpu-smoke, gpu
    for path in CONFIGS + K8S_CONFIGS:
        config = load_config(str(path))
        assert isinstance(config.loss.margin(), margins.Margin)
        assert cfg_lib.from_dict(config.to_dict()) == config  # the dump loads back unchanged


def test_shipped_config_values():
    smoke = load_config(str(ROOT / "configs/smoke.yaml"))
    assert (smoke.model.backbone, smoke.data.image_size, smoke.train.steps) == ("tiny", 32, 300)
    assert 64 <= smoke.model.embedding_dim <= 128
    assert smoke.data.train == ["data/synth"] and smoke.eval_sets() == {"verification": "data/synth/verification.bin"}
    r50 = load_config(str(ROOT / "configs/ms1mv3_r50.yaml"))
    assert r50.data.num_classes == 93431 and r50.model.backbone == "iresnet50"
    assert r50.loss.margin() == margins.ArcFace(scale=64.0, margin=0.5)
    assert (r50.optim.name, r50.optim.lr, r50.optim.momentum, r50.optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert (r50.optim.schedule, r50.train.batch_size, r50.train.epochs) == ("poly", 128, 20.0)
    assert list(r50.eval_sets()) == ["lfw", "cfp_fp", "agedb_30"]
    wf = load_config(str(ROOT / "configs/webface42m_r50_pfc02.yaml"))
    assert (wf.data.num_classes, wf.fc.sample_rate, wf.fc.compute_dtype) == (2059906, 0.2, "bfloat16")


def test_defaults_and_derived_values(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.seed == 0 and config.model.embedding_dim == 512 and config.data.image_size == 112
    assert config.loss.margin() == margins.ArcFace()
    assert config.checkpoint_dir == "runs/default/checkpoints"
    assert config.eval_sets() == {"lfw": "sets/lfw.bin", "cfp_fp": "sets/cfp_fp.bin"}
    assert config.optim.betas == (0.9, 0.999) and config.fc.chunk_size is None
    chosen = load_config(write(tmp_path, MINIMAL + "eval: {sets: [cfp_fp]}\ncheckpoint: {dir: /ck}\n"))
    assert chosen.eval_sets() == {"cfp_fp": "sets/cfp_fp.bin"} and chosen.checkpoint_dir == "/ck"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "optim: {lr: 1e-3, weight_decay: 5E-4, eps: 1e-10}\n"))
    assert (config.optim.lr, config.optim.weight_decay, config.optim.eps) == (1e-3, 5e-4, 1e-10)


BAD = [
    ("colour: red", "colour", "unknown key"),
    ("optim: {learning_rate: 0.1}", "optim.learning_rate", "unknown key"),
    ("optim: 0.1", "optim", "must be a mapping"),
    ("optim: {lr: -1}", "optim.lr", "must be >= 0.0, got -1.0"),
    ("optim: {lr: fast}", "optim.lr", "must be a number, got 'fast'"),
    ("optim: {lr: .nan}", "optim.lr", "must be finite"),
    ("optim: {momentum: 1.0}", "optim.momentum", "must be < 1.0"),
    ("optim: {nesterov: 1}", "optim.nesterov", "must be true or false"),
    ("optim: {name: adam}", "optim.name", "must be one of ['sgd', 'adamw']"),
    ("optim: {schedule: step}", "optim.schedule", "must be one of"),
    ("optim: {betas: [0.9]}", "optim.betas", "must be a list of 2 values"),
    ("optim: {betas: [0.9, 1.0]}", "optim.betas[1]", "must be < 1.0, got 1.0"),
    ("optim: {clip_norm: 0}", "optim.clip_norm", "must be > 0.0"),
    ("optim: {schedule: cosine, lr: 0.01, min_lr: 0.1}", "optim.min_lr", "must be <= optim.lr"),
    ("optim: {warmup_steps: 101}", "optim.warmup_steps", "must be <= train.steps (100)"),
    ("seed: -1", "seed", "must be >= 0"),
    ("seed: 1.5", "seed", "must be an integer"),
    ("fc: {sample_rate: 0}", "fc.sample_rate", "must be > 0.0, got 0.0"),
    ("fc: {sample_rate: 1.5}", "fc.sample_rate", "must be <= 1.0, got 1.5"),
    ("fc: {chunk_size: 0}", "fc.chunk_size", "must be >= 1"),
    ("fc: {chunk_size: 1.5}", "fc.chunk_size", "must be an integer or null, got 1.5"),
    ("fc: {compute_dtype: float64}", "fc.compute_dtype", "must be one of ['float32', 'bfloat16', 'float16']"),
    ("model: {backbone: resnet18}", "model.backbone", "must be one of"),
    ("model: {backbone: iresnet50, batch_norm: false}", "model.batch_norm", "only supported by the tiny"),
    ("model: {dropout: 1.0}", "model.dropout", "must be < 1.0"),
    ("data: {train: x, image_size: 8}\nmodel: {backbone: iresnet50}", "data.image_size", "must be >= 16"),
    ("data: {train: []}", "data.train", "required"),
    ("data: {train: x, val: [a/lfw.bin, b/lfw.bin]}", "data.val", "two sets named 'lfw'"),
    ("data: {train: [x, 3]}", "data.train[1]", "must be a string"),
    ("data: {train: [a, b]}", "data.train", "one dataset (a directory, manifest, shard file or glob), got 2"),
    ("train: {steps: 10, epochs: 2}", "train.steps", "exactly one of train.steps and train.epochs"),
    ("train: {steps: null}", "train.steps", "exactly one"),
    ("train: {batch_size: 0}", "train.batch_size", "must be >= 1"),
    ("train: {nonfinite: ignore}", "train.nonfinite", "must be one of ['stop', 'skip']"),
    ("eval: {sets: [agedb_30]}", "eval.sets[0]", "'agedb_30' is not a data.val set"),
    ("eval: {far: 0}", "eval.far", "must be > 0.0"),
    ("monitoring: {port: 70000}", "monitoring.port", "must be <= 65535"),
    ("monitoring: {pushgateway: 'pgw:9091'}", "monitoring.pushgateway", "http(s):// URL"),
    ("checkpoint: {keep: 0}", "checkpoint.keep", "must be >= 1"),
    ("checkpoint: {dir: 's3://bucket/ckpt'}", "checkpoint.dir", "object-storage URL"),
    ("train: {steps: 5, run_dir: 'gs://bucket/run'}", "train.run_dir", "object-storage URL"),
    ("train: {steps: 5, max_skipped_share: 0}", "train.max_skipped_share", "must be > 0.0"),
    ("checkpoint: {resume: null}", "checkpoint.resume", "must be a string"),
    ("loss: {name: elasticface}", "loss.name", "unknown margin 'elasticface'"),
    ("loss: {name: arcface, m: 0.5}", "loss.m", "unknown key for margin 'arcface'"),
    ("loss: {name: arcface, scale: 0}", "loss.scale", "scale must be a finite number > 0"),
    ("loss: {name: arcface, scale: 64, margin: 4}", "loss.margin", "m2 must be in [0, π)"),
    ("loss: {name: sphereface, margin: 1.5}", "loss.margin", "integer >= 1"),
]


@pytest.mark.parametrize("extra,key,message", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_values_name_the_file_and_key(tmp_path, extra, key, message):
    # The extra YAML replaces the minimal file's section of the same name.
    sections = {}
    for text in (MINIMAL, extra):
        parsed = cfg_lib.yaml.load(text, Loader=cfg_lib._Loader)
        sections.update(parsed)
    path = tmp_path / "exp.yaml"
    path.write_text(cfg_lib.yaml.safe_dump(sections))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"{path}: {key}: "), str(info.value)
    assert message in str(info.value)


def test_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(
        path,
        [
            "optim.lr=0.05",
            "loss.scale=16",
            "data.train=s3://bucket/ds",
            "seed=7",
            "optim.clip_norm=2.5",
            "model.batch_norm=false",
            "optim.weight_decay=1e-4",
            "train.steps=null",
            "train.epochs=3",
            "optim.betas=[0.8, 0.95]",
        ],
    )
    assert config.optim.lr == 0.05 and config.seed == 7 and config.optim.weight_decay == 1e-4
    assert config.loss.margin() == margins.ArcFace(scale=16, margin=0.5)
    assert config.data.train == ["s3://bucket/ds"]
    assert config.optim.clip_norm == 2.5 and config.model.batch_norm is False
    assert (config.train.steps, config.train.epochs, config.optim.betas) == (None, 3.0, (0.8, 0.95))
    # The last override of a key wins; the file is not modified.
    assert load_config(path, ["optim.lr=0.2", "optim.lr=0.3"]).optim.lr == 0.3
    assert load_config(path).optim.lr == 0.1


@pytest.mark.parametrize(
    "override,key,message",
    [
        ("optim.lr=-1", "optim.lr", "must be >= 0.0, got -1.0"),
        ("optim.lrr=0.1", "optim.lrr", "unknown key"),
        ("optimizer.lr=0.1", "optimizer.lr", "unknown key"),
        ("optim=0.1", "optim", "set one key of the section"),
        ("optim.lr.peak=0.1", "optim.lr.peak", "set one key of the section"),
        ("seed.value=1", "seed.value", "has no sub-keys"),
        ("optim.lr", "optim.lr", "must look like section.key=value"),
        ("optim.lr=[1", "optim.lr", "cannot parse the value"),
        ("loss.radius=3", "loss.radius", "unknown key for margin"),
        ("fc.sample_rate=0", "fc.sample_rate", "must be > 0.0"),
        ("train.batch_size=8.5", "train.batch_size", "must be an integer"),
    ],
)
def test_bad_overrides_name_the_key(tmp_path, override, key, message):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_config(path, [override])
    assert info.value.key == key and message in str(info.value), str(info.value)
    assert str(info.value).startswith(path)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read the config"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: {lr: [0.1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="data.train: required"):
        load_config(write(tmp_path, ""))


def test_sections_validate_when_built_in_python():
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be >= 0"):
        cfg_lib.OptimConfig(lr=-0.5)
    optim = dataclasses.replace(cfg_lib.OptimConfig(), lr=1)
    assert optim.lr == 1.0 and isinstance(optim.lr, float)


def test_cli_validates_and_prints(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert cfg_lib.main([path, "--set", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert cfg_lib.main([path, "--set", "optim.lr=-1"]) == 2
    assert f"error: {path}: optim.lr: must be >= 0.0" in capsys.readouterr().err


def test_docs_reference_is_generated_from_the_fields():
    doc = (ROOT / "docs/config.md").read_text()
    m = re.search(r"<!-- BEGIN GENERATED.*?-->\n(.*?)<!-- END GENERATED -->", doc, re.S)
    assert m, "docs/config.md lacks the generated reference markers"
    assert m.group(1) == cfg_lib.reference_markdown(), (
        "docs/config.md is out of date: regenerate with `python -m launch.config --markdown`"
    )
    for section in ("data", "model", "loss", "fc", "optim", "train", "checkpoint", "eval", "monitoring"):
        for field in dataclasses.fields(type(getattr(load_config(str(ROOT / "configs/smoke.yaml")), section))):
            if field.name != "params":
                assert f"`{section}.{field.name}`" in m.group(1)


def test_optimizer_parameters_have_one_name_for_both_optimizer_families():
    """optim.rule_params() builds the shard optimizer and the Keras one alike (no renaming)."""
    import keras
    import tensorflow as tf

    from partitioned_fc import optimizer as shard_opt

    w = tf.Variable(tf.zeros([3, 2]))
    adamw = cfg_lib.OptimConfig(name="adamw", betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01)
    assert adamw.rule_params() == {"beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-6}
    assert shard_opt.get("adamw", w, **adamw.rule_params()).get_config()["beta_2"] == 0.95
    assert keras.optimizers.AdamW(**adamw.rule_params()).get_config()["epsilon"] == 1e-6
    sgd = cfg_lib.OptimConfig(name="sgd", momentum=0.7, nesterov=True)
    assert shard_opt.get("sgd", w, **sgd.rule_params()).get_config()["momentum"] == 0.7
    assert keras.optimizers.SGD(**sgd.rule_params()).get_config()["nesterov"] is True
