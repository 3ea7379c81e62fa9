"""The experiment config: typed dataclasses, loaded from one YAML file plus `key=value` overrides.

Every key, its type, default, allowed range and meaning is declared once, in the field
definitions below; docs/config.md renders them (`python -m launch.config --markdown`, checked
by tests/test_config.py). Every section validates itself on construction, so an unknown key, a
wrong type or an impossible value is a `ConfigError` naming the dotted key (and the file when
loaded from one) before any work starts.

YAML scalars follow YAML 1.1 (PyYAML) with one change: `1e-3` is a float (YAML 1.1 needs `1.0e-3`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
import typing
from typing import Any, Literal, Optional

import yaml

from launch.backbones import BACKBONES, MIN_IMAGE_SIZE, PRECISIONS
from partitioned_fc import margins as margins_lib
from partitioned_fc.layer import DTYPES


class ConfigError(ValueError):
    """A bad config value: `[file: ]key: message`."""

    def __init__(self, key: str, message: str, file: str | None = None):
        self.key, self.message, self.file = key, message, file
        where = f"{file}: " if file else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")

    def in_file(self, file: str) -> ConfigError:
        return ConfigError(self.key, self.message, file)


# --------------------------------------------------------------------------------------------
# Field declarations: default, documentation and range in one place
# --------------------------------------------------------------------------------------------
def _field(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its documentation and numeric bounds (None values skip bounds)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"list[{inner}]" if origin is list else f"[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it normalized (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    if origin in _GENERIC:
        return _GENERIC[origin](value, tp, key)
    if tp in _SCALAR:
        return _SCALAR[tp](value, key)
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _as_union(value: Any, tp: Any, key: str) -> Any:
    """Optional[X] (X's own message, mentioning null) or the first alternative that fits."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        try:
            return _coerce(value, options[0], key)
        except ConfigError as e:
            raise ConfigError(e.key, e.message.replace(", got", " or null, got", 1)) from None
    for arg in options:
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            pass
    raise ConfigError(key, f"must be {_type_name(tp)}, got {value!r}")


def _as_literal(value: Any, tp: Any, key: str) -> Any:
    args = typing.get_args(tp)
    if isinstance(value, bool) or value not in args:
        raise ConfigError(key, f"must be one of {list(args)}, got {value!r}")
    return value


def _as_list(value: Any, tp: Any, key: str) -> list:
    (item,) = typing.get_args(tp)
    if isinstance(value, str):  # a single path where a list is expected
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"must be a list of {_type_name(item)}, got {value!r}")
    return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]


def _as_tuple(value: Any, tp: Any, key: str) -> tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ConfigError(key, f"must be a list of {len(args)} values ({_type_name(tp)}), got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _as_mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(key, f"must be a mapping of names to values, got {value!r}")
    return dict(value)


def _as_bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    return value


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(key, f"must be finite, got {value!r}")
    return float(value)


def _as_str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {value!r}")
    return value


# The annotations config fields use, each with its check.
_GENERIC = {typing.Union: _as_union, Literal: _as_literal, list: _as_list, tuple: _as_tuple}
_SCALAR = {dict: _as_mapping, bool: _as_bool, int: _as_int, float: _as_float, str: _as_str}


def _check_bounds(value: Any, meta: dict, key: str) -> None:
    """Apply the field's numeric bounds to a number, or to each number of a list/tuple."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_bounds(v, meta, f"{key}[{i}]")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    tests = {
        "ge": (lambda b: value >= b, ">="),
        "gt": (lambda b: value > b, ">"),
        "le": (lambda b: value <= b, "<="),
        "lt": (lambda b: value < b, "<"),
    }
    for name, (ok, word) in tests.items():
        bound = meta.get(name)
        if bound is not None and not ok(bound):
            raise ConfigError(key, f"must be {word} {bound}, got {value!r}")


class _Section:
    """Base of every section: checks and normalizes each field on construction, then `_check()`."""

    _key: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            key = f"{self._key}.{f.name}" if self._key else f.name
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                if not isinstance(value, hints[f.name]):
                    raise ConfigError(key, f"must be a {hints[f.name].__name__}, got {type(value).__name__}")
                continue
            value = _coerce(value, hints[f.name], key)
            _check_bounds(value, f.metadata, key)
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Checks across fields of the section."""

    def _error(self, name: str, message: str) -> ConfigError:
        return ConfigError(f"{self._key}.{name}", message)

    # How a section meets YAML: one definition here, overridden where a section's keys are open.
    @classmethod
    def has_key(cls, name: str) -> bool:
        """Whether `section.name` is a key this section takes."""
        return name in {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_mapping(cls, key: str, value: dict) -> _Section:
        """The section from its YAML mapping; an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        for sub in value:
            if sub not in known:
                raise ConfigError(f"{key}.{sub}", f"unknown key; {key} has {sorted(known)}")
        return cls(**value)

    def to_mapping(self) -> dict:
        """The section as plain YAML-able data (`from_mapping` gives it back)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def reference_rows(cls, key: str) -> list[str]:
        """docs/config.md's rows of this section's keys."""
        hints = typing.get_type_hints(cls)
        return [_row(f"{key}.{f.name}", f, hints[f.name]) for f in dataclasses.fields(cls)]


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DataConfig(_Section):
    _key: typing.ClassVar[str] = "data"
    train: list[str] = _field(
        factory=list,
        doc="Training data (pipelines/): dataset directories, "
        "shard files or globs, local or URLs (s3://, gs://, hdfs://). A single "
        "string is a one-element list. Required.",
    )
    val: list[str] = _field(
        factory=list,
        doc="Verification sets: InsightFace `.bin` files. The set's "
        "name is the file name without `.bin` (`lfw.bin` -> `lfw`); names must differ.",
    )
    num_classes: Optional[int] = _field(
        None, "C, the number of identities. null: read it from the training data's metadata.", ge=1
    )
    image_size: int = _field(112, "Side of the square input images, in pixels.", ge=8)
    shuffle_buffer: int = _field(10000, "Records in the shuffle buffer; 0 disables shuffling.", ge=0)
    skip_corrupt: bool = _field(
        False,
        "Skip undecodable records instead of stopping; the count "
        "(all workers) is in the progress line and log.jsonl's corrupt_records.",
    )
    flip: bool = _field(
        True,
        "Random horizontal flip in training. Off for data whose mirror image "
        "is another class (characters: configs/fonts.yaml).",
    )
    closed: Optional[str] = _field(
        None,
        "A labelled dataset (directory) of the training classes in "
        "new conditions (`pfc data fonts` writes OUT/closed): `pfc eval` "
        "reports its top-1 accuracy through the trained class matrix.",
    )

    def _check(self) -> None:
        if not self.train:
            raise self._error("train", "required: at least one path, glob or URL")
        if len(self.train) > 1:  # one reader stream; a glob or a manifest joins several shard sets
            raise self._error(
                "train", f"one dataset (a directory, manifest, shard file or glob), got {len(self.train)}: {self.train}"
            )
        if any(not p for p in self.train + self.val):
            raise self._error("train" if "" in self.train else "val", "contains an empty path")
        names: dict[str, str] = {}
        for path in self.val:
            name = val_set_name(path)
            if name in names:
                raise self._error("val", f"two sets named {name!r}: {names[name]} and {path}")
            names[name] = path

    def val_sets(self) -> dict[str, str]:
        """{set name: path} of the verification sets, in file order."""
        return {val_set_name(p): p for p in self.val}


def val_set_name(path: str) -> str:
    """`.../cfp_fp.bin` -> `cfp_fp`."""
    base = path.rstrip("/").rsplit("/", 1)[-1]
    return base[:-4] if base.endswith(".bin") else base


@dataclasses.dataclass
class ModelConfig(_Section):
    _key: typing.ClassVar[str] = "model"
    backbone: Literal[BACKBONES] = _field("iresnet50", "Backbone network (launch/backbones.py).")
    embedding_dim: int = _field(512, "D, the width of the embedding (and of the class matrix rows).", ge=1)
    dropout: float = _field(0.0, "Dropout rate in the embedding head, before the dense layer.", ge=0.0, lt=1.0)
    batch_norm: bool = _field(
        True,
        "false: no batch normalization anywhere (tiny backbone only). A model "
        "without batch statistics gives the same gradients for any split of a batch.",
    )
    precision: Literal[PRECISIONS] = _field(
        "float32",
        "Backbone compute precision (a Keras dtype policy; variables stay float32): "
        "mixed_bfloat16, or mixed_float16 with dynamic loss scaling (docs/config.md). The class "
        "matrix has its own dtypes (fc.compute_dtype, fc.param_dtype).",
    )

    gradient_checkpointing: bool = _field(
        False,
        "Keep only each backbone unit's input in the forward and recompute the unit in the "
        "backward (launch/recompute.py): less activation memory, about one more forward of compute.",
    )

    def _check(self) -> None:
        if not self.batch_norm and self.backbone != "tiny":
            raise self._error("batch_norm", f"false is only supported by the tiny backbone, not {self.backbone!r}")


@dataclasses.dataclass
class LossConfig(_Section):
    """The margin; every other key of the `loss` section is a parameter of that margin."""

    _key: typing.ClassVar[str] = "loss"
    name: str = _field(
        "arcface",
        "Margin: one of "
        + ", ".join(margins_lib.available())
        + " (docs/margins.md). Its parameters are further keys of this section, e.g. "
        "`scale`, `margin`; omitted ones keep the margin's defaults.",
    )
    params: dict = _field(
        factory=dict, doc="(not a YAML key) the margin's parameters, from the other keys of the section."
    )

    def _check(self) -> None:
        self.margin()

    # Open keys: `name` and whatever parameters the named margin takes (checked by `margin()`).
    @classmethod
    def has_key(cls, name: str) -> bool:
        return True

    @classmethod
    def from_mapping(cls, key: str, value: dict) -> LossConfig:
        named = {"name": value["name"]} if "name" in value else {}
        return cls(**named, params={k: v for k, v in value.items() if k != "name"})

    def to_mapping(self) -> dict:
        return {"name": self.name, **self.params}

    @classmethod
    def reference_rows(cls, key: str) -> list[str]:
        name = next(f for f in dataclasses.fields(cls) if f.name == "name")
        return [
            _row(f"{key}.name", name, str),
            "| `loss.<param>` | per margin | the margin's | Any parameter of the "
            "chosen margin, e.g. `scale`, `margin`, `m1`, `lambda_`, `k` (Sub-center ArcFace's sub-centers "
            "per class), and on every margin with normalized weights `interclass_filtering_threshold` "
            "(0: off; docs/margins.md). |",
        ]

    def margin(self) -> margins_lib.Margin:
        """The `partitioned_fc.margins.Margin` this section describes."""
        try:
            return margins_lib.get(self.name, **self.params)
        except (TypeError, ValueError) as e:
            raise self._margin_error(e) from None

    def _margin_error(self, e: Exception) -> ConfigError:
        text = str(e)
        if text.startswith("unknown margin"):
            return self._error("name", f"unknown margin {self.name!r}; expected one of {margins_lib.available()}")
        m = re.match(r"unknown parameter\(s\) \[(.*?)\]", text)
        if m:
            first = m.group(1).split(",")[0].strip(" '\"")
            return self._error(first, f"unknown key for margin {self.name!r} ({text})")
        for key, value in self.params.items():  # the culprit is the parameter that fails alone
            try:
                margins_lib.get(self.name, **{key: value})
            except (TypeError, ValueError):
                return self._error(key, text)
        return ConfigError(self._key, text)


@dataclasses.dataclass
class FCConfig(_Section):
    _key: typing.ClassVar[str] = "fc"
    sample_rate: float = _field(
        1.0,
        "Partial FC: fraction of each shard's classes in each step's "
        "softmax (positives always kept); 1.0 is the exact full softmax.",
        gt=0.0,
        le=1.0,
    )
    chunk_size: Optional[int] = _field(
        None,
        "Classes per chunk when a shard's logits are computed in "
        "pieces to bound memory; null: the whole shard at once.",
        ge=1,
    )
    compute_dtype: Literal[DTYPES] = _field(
        "float32", "Dtype of the logits matmul; the softmax statistics stay float32."
    )
    param_dtype: Literal[DTYPES] = _field(
        "float32", "Dtype in which the class matrix (and its optimizer state) is stored."
    )


@dataclasses.dataclass
class OptimConfig(_Section):
    _key: typing.ClassVar[str] = "optim"
    name: Literal["sgd", "adamw"] = _field("sgd", "Optimizer for backbone and class matrix.")
    lr: float = _field(0.1, "Peak learning rate (after warm-up), for the global batch.", ge=0.0)
    momentum: float = _field(0.9, "SGD momentum (sgd only).", ge=0.0, lt=1.0)
    nesterov: bool = _field(False, "Nesterov momentum (sgd only).")
    weight_decay: float = _field(
        5e-4, "sgd: L2 penalty added to the gradient; adamw: decoupled decay, multiplied by the learning rate.", ge=0.0
    )
    betas: tuple[float, float] = _field((0.9, 0.999), "AdamW's (beta1, beta2) (adamw only).", ge=0.0, lt=1.0)
    eps: float = _field(1e-8, "AdamW's epsilon (adamw only).", gt=0.0)
    warmup_steps: int = _field(0, "Steps of linear warm-up from lr/warmup_steps to lr.", ge=0)
    schedule: Literal["constant", "poly", "cosine"] = _field(
        "constant", "Decay after warm-up, to min_lr at the last step (launch/schedule.py)."
    )
    power: float = _field(2.0, "Exponent of the poly schedule.", gt=0.0)
    min_lr: float = _field(0.0, "Learning rate at the end of the poly and cosine schedules.", ge=0.0)
    clip_norm: Optional[float] = _field(
        None, "Clip the backbone's gradient to this global L2 norm; null: no clipping.", gt=0.0
    )
    fc_lr_scale: float = _field(1.0, "The class matrix's learning rate is lr * fc_lr_scale.", ge=0.0)

    def rule_params(self) -> dict:
        """The optimizer's own parameters, named as both the shard optimizers
        (partitioned_fc.optimizer) and Keras take them."""
        if self.name == "sgd":
            return {"momentum": self.momentum, "nesterov": self.nesterov}
        return {"beta_1": self.betas[0], "beta_2": self.betas[1], "epsilon": self.eps}

    def _check(self) -> None:
        if self.schedule != "constant" and self.min_lr > self.lr:
            raise self._error(
                "min_lr", f"must be <= optim.lr ({self.lr}) for the {self.schedule} schedule, got {self.min_lr}"
            )


def _check_posix_dir(section, key: str, path: str) -> None:
    """The run and checkpoint folders are files on a filesystem every worker mounts (local, NFS, a
    volume): their atomic renames and the run's lock need one. Object storage is for data."""
    if "://" in path:
        raise section._error(
            key,
            f"{path!r} is an object-storage URL: the run and checkpoint "
            "directories must be a filesystem path every worker sees (a local "
            "disk for one node; NFS or a shared volume for several)",
        )


@dataclasses.dataclass
class TrainConfig(_Section):
    _key: typing.ClassVar[str] = "train"
    batch_size: int = _field(
        128, "Samples per worker per step (the global batch is this times the number of workers).", ge=1
    )
    steps: Optional[int] = _field(
        None, "Length of the run in optimizer steps. Exactly one of steps and epochs is set.", ge=1
    )
    epochs: Optional[float] = _field(None, "Length of the run in passes over the training data.", gt=0.0)
    log_every: int = _field(50, "Steps between progress lines (terminal and JSON log).", ge=1)
    nonfinite: Literal["stop", "skip"] = _field(
        "stop",
        "On a non-finite loss: stop with an error "
        "naming the step, or skip the update (nothing of the "
        "step is applied) and count it.",
    )
    max_skipped_share: float = _field(
        0.05,
        "With nonfinite: skip, stop once more than ceil(share x planned steps) steps were skipped.",
        gt=0.0,
        le=1.0,
    )
    max_skipped_in_a_row: int = _field(
        10, "With nonfinite: skip, stop once more than this many consecutive steps were skipped.", ge=0
    )
    run_dir: str = _field(
        "runs/default", "Directory for the JSON log, the resolved config and (by default) checkpoints."
    )

    def _check(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise self._error(
                "steps",
                f"set exactly one of train.steps and train.epochs (got steps={self.steps}, epochs={self.epochs})",
            )
        if not self.run_dir:
            raise self._error("run_dir", "must not be empty")
        _check_posix_dir(self, "run_dir", self.run_dir)


@dataclasses.dataclass
class CheckpointConfig(_Section):
    _key: typing.ClassVar[str] = "checkpoint"
    every: int = _field(1000, "Steps between checkpoints; 0: only at the end.", ge=0)
    keep: int = _field(3, "Keep the last K checkpoints.", ge=1)
    dir: Optional[str] = _field(None, "Checkpoint directory; null: the folder checkpoints in train.run_dir.")
    resume: str = _field(
        "auto",
        "auto: continue from the newest checkpoint in dir if there is one; "
        "none: start fresh; otherwise the path of a checkpoint to start from.",
    )

    def _check(self) -> None:
        if self.dir == "":
            raise self._error("dir", "must not be empty (null means <train.run_dir>/checkpoints)")
        if self.dir is not None:
            _check_posix_dir(self, "dir", self.dir)
        if not self.resume:
            raise self._error("resume", "must be auto, none or a checkpoint path")


@dataclasses.dataclass
class EvalConfig(_Section):
    _key: typing.ClassVar[str] = "eval"
    interval: int = _field(0, "Steps between verification runs during training; 0: only at the end.", ge=0)
    sets: list[str] = _field(
        factory=list, doc="Names of the data.val sets to evaluate (file names without .bin); empty: all of them."
    )
    batch_size: int = _field(256, "Images per forward pass during evaluation.", ge=1)
    folds: int = _field(10, "Folds of the cross-validated threshold search.", ge=2)
    far: float = _field(1e-3, "False accept rate at which TAR is reported.", gt=0.0, lt=1.0)
    flip: bool = _field(True, "Sum the embeddings of each image and its horizontal flip.")


@dataclasses.dataclass
class MonitoringConfig(_Section):
    _key: typing.ClassVar[str] = "monitoring"
    port: int = _field(
        9100,
        "Base port of the Prometheus exporter; the worker of local rank r on a host serves port + r. 0 disables.",
        ge=0,
        le=65535,
    )
    bind: str = _field("0.0.0.0", "Address the exporter listens on.")
    pushgateway: Optional[str] = _field(
        None, "Pushgateway URL: metrics are pushed every 30 s and when the run ends; null: none."
    )
    job: str = _field("pfc", "Job name of the pushed metrics.")

    def _check(self) -> None:
        if not self.bind:
            raise self._error("bind", "must not be empty")
        if not self.job:
            raise self._error("job", "must not be empty")
        if self.pushgateway is not None and not re.match(r"^https?://[^/\s]+", self.pushgateway):
            raise self._error("pushgateway", f"must be an http(s):// URL or null, got {self.pushgateway!r}")


@dataclasses.dataclass
class Config(_Section):
    """The whole experiment. Build with `load_config`; sections validate on construction."""

    seed: int = _field(0, "Seed of every initializer, sampler and shuffle.", ge=0)
    data: DataConfig = _field(doc="Training data and verification sets.", factory=DataConfig)
    model: ModelConfig = _field(doc="The backbone.", factory=ModelConfig)
    loss: LossConfig = _field(doc="The margin softmax.", factory=LossConfig)
    fc: FCConfig = _field(doc="The model-parallel class matrix.", factory=FCConfig)
    optim: OptimConfig = _field(doc="Optimizer and learning-rate schedule.", factory=OptimConfig)
    train: TrainConfig = _field(doc="Run length, batch and logging.", factory=TrainConfig)
    checkpoint: CheckpointConfig = _field(doc="Checkpoints.", factory=CheckpointConfig)
    eval: EvalConfig = _field(doc="Verification during and after training.", factory=EvalConfig)
    monitoring: MonitoringConfig = _field(doc="Prometheus metrics.", factory=MonitoringConfig)

    def _check(self) -> None:
        smallest = MIN_IMAGE_SIZE[self.model.backbone]
        if self.data.image_size < smallest:
            raise ConfigError(
                "data.image_size",
                f"must be >= {smallest} for the {self.model.backbone} backbone, got {self.data.image_size}",
            )
        names = self.data.val_sets()
        for i, name in enumerate(self.eval.sets):
            if name not in names:
                raise ConfigError(f"eval.sets[{i}]", f"{name!r} is not a data.val set; have {list(names)}")
        if self.train.steps is not None and self.optim.warmup_steps > self.train.steps:
            raise ConfigError(
                "optim.warmup_steps", f"must be <= train.steps ({self.train.steps}), got {self.optim.warmup_steps}"
            )

    @property
    def checkpoint_dir(self) -> str:
        """checkpoint.dir, or <train.run_dir>/checkpoints when it is null."""
        return self.checkpoint.dir or os.path.join(self.train.run_dir, "checkpoints")

    def eval_sets(self) -> dict[str, str]:
        """{name: path} of the verification sets to evaluate."""
        sets = self.data.val_sets()
        return {n: sets[n] for n in self.eval.sets} if self.eval.sets else sets

    def to_dict(self) -> dict:
        """The config as plain YAML-able data; `from_dict(to_dict())` gives it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_mapping() if isinstance(value, _Section) else _plain(value)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `5E+4` as floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def from_dict(raw: Any) -> Config:
    """Build and validate a Config from parsed YAML (a mapping of sections); raises ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"the top level must be a mapping of sections, got {type(raw).__name__}")
    sections = _sections()
    top = {f.name for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(str(key), f"unknown key; expected one of {sorted(top)}")
        if key not in sections:
            kwargs[key] = value
            continue
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of keys, got {value!r}")
        kwargs[key] = sections[key].from_mapping(key, value)
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=0.05` -> (["optim", "lr"], 0.05); the value follows the YAML scalar rules."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(key or text, f"an override must look like section.key=value, got {text!r}")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(key, f"cannot parse the value {value!r}: {e}") from None
    return key.split("."), parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each `dotted.key=value` in a copy of the parsed YAML; unknown keys are errors."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    sections = _sections()
    top = {f.name for f in dataclasses.fields(Config)}
    for text in overrides:
        path, value = parse_override(text)
        dotted = ".".join(path)
        if path[0] not in top:
            raise ConfigError(dotted, f"unknown key; expected one of {sorted(top)}")
        if path[0] not in sections:
            if len(path) != 1:
                raise ConfigError(dotted, f"unknown key: {path[0]} has no sub-keys")
            raw[path[0]] = value
            continue
        if len(path) != 2:
            raise ConfigError(dotted, f"unknown key: set one key of the section, e.g. {path[0]}.KEY=VALUE")
        cls = sections[path[0]]
        if not cls.has_key(path[1]):
            raise ConfigError(dotted, f"unknown key; {path[0]} has {sorted(f.name for f in dataclasses.fields(cls))}")
        section = raw.get(path[0])
        if section is not None and not isinstance(section, dict):
            raise ConfigError(path[0], f"must be a mapping of keys, got {section!r}")
        raw[path[0]] = dict(section or {}, **{path[1]: value})
    return raw


def load_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, validate. Errors name the file and the key."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise ConfigError("", f"cannot read the config: {e.strerror or e}", path) from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"not valid YAML: {e}", path) from None
    try:
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError("", f"the top level must be a mapping of sections, got {type(raw).__name__}")
        return from_dict(apply_overrides(raw or {}, list(overrides)))
    except ConfigError as e:
        raise e.in_file(path) from None


# --------------------------------------------------------------------------------------------
# Reference rendering (docs/config.md)
# --------------------------------------------------------------------------------------------
def _default_text(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def _bounds_text(meta: dict) -> str:
    parts = [
        f"{word} {meta[b]}"
        for b, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
        if meta.get(b) is not None
    ]
    return ", ".join(parts)


def reference_markdown() -> str:
    """The key reference of docs/config.md, generated from the field definitions."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            lines.append(_row(f.name, f, hints[f.name]))
            continue
        lines.append(f"| **{f.name}** | section | | {f.metadata['doc']} |")
        lines += cls.reference_rows(f.name)
    return "\n".join(lines) + "\n"


def _row(key: str, f: dataclasses.Field, tp: Any) -> str:
    bounds = _bounds_text(f.metadata)
    kind = _type_name(tp) + (f", {bounds}" if bounds else "")
    return f"| `{key}` | {kind} | `{_default_text(f)}` | {f.metadata['doc']} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.config", description="Validate a config, or print the key reference."
    )
    parser.add_argument("config", nargs="?", help="a YAML config to validate and print resolved")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--markdown", action="store_true", help="print the key reference table")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(reference_markdown())
        return 0
    if not args.config:
        parser.error("give a config file or --markdown")
    try:
        sys.stdout.write(load_config(args.config, args.overrides).to_yaml())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
