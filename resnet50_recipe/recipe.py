"""Recipes: frozen dataclasses that mirror the YAML one-to-one.

A recipe file is a mapping of sections (model, data, augment, ...) onto the dataclasses below. Loading
resolves `extends:` overlays, applies `--set section.key=value` overrides, and validates every key, type
and range before any work starts, so a typo fails in a second instead of after an hour of training.
Defaults live here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, Union

import yaml

from resnet50_recipe.errors import RecipeError

__all__ = ["RecipeError", "IMAGENET_MEAN", "IMAGENET_STD",
           "ModelConfig", "SyntheticConfig", "DataConfig", "ProgressiveConfig",
           "AugmentConfig", "MixupConfig", "LossConfig", "OptimConfig", "SchedConfig", "EmaConfig", "TrainConfig",
           "CheckpointConfig", "LogConfig", "ExportConfig", "Recipe", "parse_scalar", "shipped_recipes",
           "resolve_recipe_path", "load_recipe", "to_dict", "to_yaml", "scaled_lr", "RESUME_SAFE", "recipe_diff",
           "check_names"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN, repeated to keep timm out of recipe loading

IMAGENET_STD = (0.229, 0.224, 0.225)


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    return {"range": (lo, hi, lo_open, hi_open)}


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet50"
    drop_rate: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    drop_path: float = field(default=0.0, metadata=_range(0, 1, hi_open=True))
    zero_init_last: bool = True
    grad_checkpointing: bool = False
    aa_layer: Optional[Literal["blurpool"]] = None


@dataclass(frozen=True)
class SyntheticConfig:
    classes: int = field(default=10, metadata=_range(2, 1000))
    per_class: int = field(default=300, metadata=_range(1))
    val_per_class: int = field(default=50, metadata=_range(1))
    size: int = field(default=64, metadata=_range(16, 1024))
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    path: Optional[str] = None
    synthetic: Optional[SyntheticConfig] = None
    workers: Optional[int] = field(default=None, metadata=_range(0, 256))
    bad_images: Literal["error", "skip"] = "error"
    aug_repeats: int = field(default=1, metadata=_range(1, 16))
    pin_memory: bool = True


@dataclass(frozen=True)
class ProgressiveConfig:
    min_size: int = field(default=160, metadata=_range(16, 4096))
    start_epoch: int = field(default=0, metadata=_range(0))
    end_epoch: int = field(default=1, metadata=_range(0))
    multiple: int = field(default=32, metadata=_range(1, 512))


@dataclass(frozen=True)
class AugmentConfig:
    train_size: int = field(default=224, metadata=_range(16, 4096))
    progressive: Optional[ProgressiveConfig] = None
    eval_size: int = field(default=224, metadata=_range(16, 4096))
    crop_pct: float = field(default=0.875, metadata=_range(0, 1, lo_open=True))
    eval_flip: bool = False
    interpolation: Literal["bilinear", "bicubic", "random"] = "bilinear"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = field(default=0.5, metadata=_range(0, 1))
    auto_augment: Optional[str] = None
    color_jitter: Optional[float] = field(default=0.4, metadata=_range(0, 2))
    re_prob: float = field(default=0.0, metadata=_range(0, 1))
    re_mode: Literal["const", "rand", "pixel"] = "pixel"
    re_count: int = field(default=1, metadata=_range(1, 16))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    draft_decode: bool = True


@dataclass(frozen=True)
class MixupConfig:
    mixup_alpha: float = field(default=0.0, metadata=_range(0))
    cutmix_alpha: float = field(default=0.0, metadata=_range(0))
    prob: float = field(default=1.0, metadata=_range(0, 1))
    switch_prob: float = field(default=0.5, metadata=_range(0, 1))
    mode: Literal["batch", "pair", "elem"] = "batch"


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["ce", "bce"] = "ce"
    label_smoothing: float = field(default=0.1, metadata=_range(0, 1, hi_open=True))
    bce_target_thresh: Optional[float] = field(default=None, metadata=_range(0, 1))


@dataclass(frozen=True)
class OptimConfig:
    opt: str = "sgd"
    lr: Optional[float] = field(default=None, metadata=_range(0, lo_open=True))
    lr_base: float = field(default=0.1, metadata=_range(0, lo_open=True))
    lr_base_size: int = field(default=256, metadata=_range(1))
    lr_base_scale: Optional[Literal["linear", "sqrt"]] = None
    momentum: float = field(default=0.9, metadata=_range(0, 1, hi_open=True))
    weight_decay: float = field(default=1e-4, metadata=_range(0))
    no_decay_norm_bias: bool = True
    clip_grad: Optional[float] = field(default=None, metadata=_range(0, lo_open=True))
    clip_mode: Literal["norm", "value", "agc"] = "norm"
    fused: Literal["auto", "on", "off"] = "auto"


@dataclass(frozen=True)
class SchedConfig:
    kind: Literal["cosine", "step", "poly"] = "cosine"
    warmup_epochs: int = field(default=5, metadata=_range(0))
    warmup_lr: float = field(default=1e-5, metadata=_range(0))
    min_lr: float = field(default=0.0, metadata=_range(0))
    decay_epochs: float = field(default=30, metadata=_range(0, lo_open=True))
    decay_rate: float = field(default=0.1, metadata=_range(0, 1, lo_open=True))
    cooldown_epochs: int = field(default=0, metadata=_range(0))


@dataclass(frozen=True)
class EmaConfig:
    enabled: bool = False
    decay: float = field(default=0.9998, metadata=_range(0, 1, hi_open=True))
    warmup: bool = False
    every: int = field(default=1, metadata=_range(1))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = field(default=100, metadata=_range(1))
    batch_size: int = field(default=64, metadata=_range(1))
    accum_steps: int = field(default=1, metadata=_range(1))
    steps_per_epoch: Optional[int] = field(default=None, metadata=_range(1))
    amp: bool = True
    amp_dtype: Literal["auto", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    eval_every: int = field(default=1, metadata=_range(1))
    sync_bn: bool = False
    stop_sync_every: int = field(default=5, metadata=_range(1))
    budget_usd: Optional[float] = field(default=None, metadata=_range(0, lo_open=True))
    budget_mode: Literal["stop", "fit"] = "stop"


@dataclass(frozen=True)
class CheckpointConfig:
    every_epochs: int = field(default=2, metadata=_range(1))
    every_steps: Optional[int] = field(default=None, metadata=_range(1))
    every_minutes: Optional[float] = field(default=None, metadata=_range(0, lo_open=True))
    keep_last: int = field(default=2, metadata=_range(1))
    keep_best: bool = True
    remote: Optional[str] = None
    endpoint_url: Optional[str] = None
    checksum: Literal["when_supported", "when_required"] = "when_supported"
    # How long a start retries a store failing with errors that pass (network, 5xx, throttling) before exit 75.
    startup_retry_s: float = field(default=300.0, metadata=_range(0))
    upload_timeout_s: float = field(default=600.0, metadata=_range(0, lo_open=True))
    stop_timeout_s: float = field(default=100.0, metadata=_range(0, lo_open=True))
    spot_notice: Literal["auto", "on", "off"] = "auto"
    imds_endpoint: Optional[str] = None
    spot_poll_s: float = field(default=5.0, metadata=_range(0, lo_open=True))


@dataclass(frozen=True)
class LogConfig:
    every_steps: int = field(default=50, metadata=_range(1))
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "resnet50-recipe"
    wandb_entity: Optional[str] = None


@dataclass(frozen=True)
class ExportConfig:
    enabled: bool = True
    weights: Literal["auto", "ema", "raw", "best"] = "auto"
    repo_id: Optional[str] = None
    private: bool = True
    license: str = "apache-2.0"
    dataset: Optional[str] = None
    label_names: Optional[str] = None
    # How long the push to the Hub may take: huggingface_hub's HTTP client has no timeout of its own, and a Hub
    # that never answers would otherwise hold the run, and an instance's bill, for ever. Past it: exit 3.
    push_timeout_s: float = field(default=1800.0, metadata=_range(0, lo_open=True))


@dataclass(frozen=True)
class Recipe:
    name: str = "recipe"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    mixup: MixupConfig = MixupConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    sched: SchedConfig = SchedConfig()
    ema: EmaConfig = EmaConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()
    export: ExportConfig = ExportConfig()


# ---------------------------------------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 scalars: `1e-4` is a float (YAML 1.1 wants `1.0e-4`, which nobody writes), and
    only true/false are booleans, so `spot_notice: off` stays the string it looks like."""

_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*(?:[eE][-+]?\d+)?$"
               r"|^[-+]?\.\d+(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A YAML mapping, where a key written twice is an error: YAML itself lets the last one win, silently."""
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise RecipeError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first at line "
                              f"{seen[key] + 1}); write each key once")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)

_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def parse_scalar(text: str, where: str = "--set") -> Any:
    """Parse an override value the way the recipe file would: `0.1` is a float, `null` is None."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, RecipeError) as e:
        raise RecipeError(f"{where}: {text!r} is not a valid YAML value ({str(e).splitlines()[0]}); quote a string "
                          "that holds YAML syntax, e.g. --set 'augment.auto_augment=\"rand-m9\"'") from None


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file (it is not UTF-8); a recipe is a YAML file") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except RecipeError as e:
        raise RecipeError(f"{path}: {e}") from None
    if data is None:
        # An empty file would train every default (a ResNet-50) on whatever --data names: surely a mistake.
        raise RecipeError(f"{path}: the recipe is empty; write its sections, or `extends: smoke` (a shipped "
                          "recipe) to start from one")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------------------
# Finding recipes


def shipped_recipes() -> dict[str, Path]:
    """Name -> path of every recipe that ships inside the package."""
    folder = importlib.resources.files("resnet50_recipe.recipes")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(source: str | Path, relative_to: Path | None = None) -> Path:
    """A path to an existing file, or the name of a shipped recipe (`imagenet-81` or `imagenet-81.yaml`)."""
    candidate = Path(source)
    if relative_to is not None and not candidate.is_absolute():
        candidate = relative_to / candidate
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        raise RecipeError(f"recipe {str(source)!r} is a folder; give a YAML file or a shipped recipe name")
    shipped = shipped_recipes()
    name = Path(str(source)).name
    name = name[:-5] if name.endswith(".yaml") else name
    if name in shipped and (relative_to is not None or Path(str(source)).name == str(source)):
        return shipped[name]
    hint = _closest(name, shipped)
    raise RecipeError(f"recipe {str(source)!r} is neither a file nor a shipped recipe; shipped recipes: "
                      f"{', '.join(sorted(shipped))}" + (f" (did you mean {hint!r}?)" if hint else ""))


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_recipe(source: str | Path | Mapping, overrides: Sequence[str] = ()) -> Recipe:
    """Load a recipe by path or shipped name (or from a mapping), apply `section.key=value` overrides, validate.

    Raises RecipeError naming the file, the key and what would be valid.
    """
    origins: dict[str, str] = {}
    if isinstance(source, Mapping):
        data = _compose(dict(source), "<mapping>", None, origins, ())
        default_name = "recipe"
    else:
        path = resolve_recipe_path(source)
        data = _load_file(path, origins, ())
        default_name = path.stem
    for item in overrides:
        _apply_override(data, item, origins)
    data.setdefault("name", default_name)
    origins.setdefault("name", "<default>")
    recipe = _build(Recipe, data, "", origins)
    try:
        check_names(recipe)
    except RecipeError as e:  # its message starts with the key; add the file that set it
        raise RecipeError(_where(str(e).split(":")[0], origins) + str(e)) from None
    return recipe


def _load_file(path: Path, origins: dict[str, str], chain: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in chain:
        raise RecipeError(f"{path}: `extends` makes a cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    return _compose(_read_yaml(path), str(path), path.parent, origins, chain + (path,))


def _compose(data: dict, where: str, folder: Path | None, origins: dict[str, str], chain) -> dict:
    """Resolve `extends:` (a path relative to this file, or a shipped name), then overlay this file's keys."""
    parents = data.pop("extends", None)
    _check_keys(Recipe, data, "", where)
    merged: dict = {}
    if parents is not None and not isinstance(parents, (str, list)):
        raise RecipeError(f"{where}: `extends` must be a recipe file or shipped name, or a list of them, got "
                          f"{parents!r}")
    for parent in [parents] if isinstance(parents, str) else (parents or []):
        if not isinstance(parent, str):
            raise RecipeError(f"{where}: `extends` must be a recipe file or shipped name, or a list of them, got "
                              f"{parent!r} in the list")
        merged = _merge(merged, _load_file(resolve_recipe_path(parent, folder or Path.cwd()), origins, chain))
    _record_origins(data, "", where, origins)
    return _merge(merged, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _record_origins(data: dict, prefix: str, where: str, origins: dict[str, str]) -> None:
    for key, value in data.items():
        origins[prefix + key] = where
        if isinstance(value, dict):
            _record_origins(value, f"{prefix}{key}.", where, origins)


def _apply_override(data: dict, item: str, origins: dict[str, str]) -> None:
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected section.key=value, e.g. train.epochs=10")
    dotted, _, text = item.partition("=")
    keys = dotted.strip().split(".")
    cls: Any = Recipe
    node = data
    for depth, key in enumerate(keys):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if key not in names:
            prefix = ".".join(keys[:depth])
            raise RecipeError(_unknown_key_message("--set", prefix, key, names))
        sub = _dataclass_of(typing.get_type_hints(cls)[key])
        if depth == len(keys) - 1:
            node[key] = parse_scalar(text, f"--set {dotted.strip()}")
        else:
            if sub is None:
                raise RecipeError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is a value, not a section")
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node, cls = node[key], sub
    origins[dotted.strip()] = "--set"


def _dataclass_of(hint) -> type | None:
    for candidate in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def _closest(word: str, choices) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def _unknown_key_message(where: str, prefix: str, key: str, valid) -> str:
    full = f"{prefix}.{key}" if prefix else key
    hint = _closest(key, valid)
    suggestion = f"did you mean {(prefix + '.' if prefix else '') + hint!r}? " if hint else ""
    return (f"{where}: unknown key {full!r}; {suggestion}valid keys"
            f"{' in ' + prefix if prefix else ''}: {', '.join(sorted(valid))}")


def _check_keys(cls, data: dict, prefix: str, where: str) -> None:
    """Unknown keys are errors, reported against the file that wrote them."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise RecipeError(_unknown_key_message(where, prefix.rstrip("."), str(key), names))
        sub = _dataclass_of(typing.get_type_hints(cls)[key])
        if sub is not None and isinstance(value, dict):
            _check_keys(sub, value, f"{prefix}{key}.", where)


def _build(cls, data: Any, prefix: str, origins: dict[str, str]):
    if not isinstance(data, dict):
        raise RecipeError(f"{_where(prefix.rstrip('.'), origins)}{prefix.rstrip('.')}: expected a mapping of "
                          f"keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], f, prefix + f.name, origins)
    return cls(**kwargs)


def _where(key: str, origins: dict[str, str]) -> str:
    while key:
        if key in origins:
            return f"{origins[key]}: "
        key = key.rpartition(".")[0]
    return ""


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is tuple:
        args = typing.get_args(hint)
        return f"a list of {len(args)} {_describe(args[0])}s"
    if dataclasses.is_dataclass(hint):
        return "a mapping of " + ", ".join(f.name for f in dataclasses.fields(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _convert(value: Any, hint, f, key: str, origins: dict[str, str]):
    def fail(what: str = ""):
        raise RecipeError(f"{_where(key, origins)}{key}: {what or 'invalid value'} {value!r}; "
                          f"expected {_describe(hint)}{_range_text(f)}")

    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0]
        origin = typing.get_origin(hint)
    elif value is None:
        fail("null is not allowed:")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", origins)
    if origin is Literal:
        if value not in typing.get_args(hint):
            fail("invalid value")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail("wrong shape:")
        return tuple(_scalar(v, a, fail) for v, a in zip(value, args))
    converted = _scalar(value, hint, fail)
    if "range" in f.metadata:
        lo, hi, lo_open, hi_open = f.metadata["range"]
        if ((lo is not None and (converted < lo or (lo_open and converted == lo)))
                or (hi is not None and (converted > hi or (hi_open and converted == hi)))):
            fail("out of range:")
    return converted


def _scalar(value: Any, hint, fail):
    # bool is an int subclass in Python; a YAML `1` for a flag or `true` for a count is a mistake.
    if hint is bool:
        if not isinstance(value, bool):
            fail("wrong type:")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("wrong type:")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fail("wrong type:")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            fail("wrong type:")
    return value


def _range_text(f) -> str:
    if not f.metadata.get("range"):
        return ""
    lo, hi, lo_open, hi_open = f.metadata["range"]
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " " + " and ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Output and derived values


def to_dict(recipe: Recipe) -> dict:
    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(recipe))


def to_yaml(recipe: Recipe) -> str:
    """The resolved recipe; loading it back gives an equal Recipe."""
    return yaml.safe_dump(to_dict(recipe), sort_keys=False, default_flow_style=False)


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """Absolute lr, or lr_base per lr_base_size images scaled to the global batch, as timm's train.py does.

    timm's rule when lr_base_scale is unset: sqrt scaling for adaptive optimizers (adam*, lamb, ...), linear
    for SGD-style ones.
    """
    if optim.lr is not None:
        return optim.lr
    rule = optim.lr_base_scale
    if rule is None:
        rule = "sqrt" if any(k in optim.opt.lower() for k in ("ada", "lamb", "lion")) else "linear"
    ratio = global_batch / optim.lr_base_size
    return optim.lr_base * (math.sqrt(ratio) if rule == "sqrt" else ratio)


# Keys that change where or how fast a run goes, not what it computes: they may differ on resume.
# train.batch_size is per process: what must match is the global batch, checked on its own.
# data.bad_images changes nothing unless an image is unreadable, and then only whether the run goes on;
# train.budget_usd and train.budget_mode only where it stops or how much of the schedule is left (a run stopped
# by its budget resumes with a larger one, or with budget_mode: fit; a shortened plan is in the checkpoint).
RESUME_SAFE = ("name", "data.path", "data.workers", "data.pin_memory", "data.bad_images", "train.device",
               "train.compile", "train.channels_last", "train.deterministic", "train.stop_sync_every",
               "train.budget_usd", "train.budget_mode", "train.batch_size", "optim.fused", "log.", "checkpoint.",
               "export.")


def recipe_diff(old: Mapping, new: Mapping) -> list[str]:
    """`key: old -> new` for every key whose change would change the result of resuming a run."""
    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, Mapping):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[prefix + key] = list(value) if isinstance(value, tuple) else value
        return out

    a, b = flat(old), flat(new)
    return [f"{key}: {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and not key.startswith(RESUME_SAFE) and key not in RESUME_SAFE]


def check_names(recipe: Recipe) -> None:
    """Checks that need timm's registries: model, optimizer and auto-augment names, and cross-key rules."""
    import timm
    import timm.optim
    from timm.data import create_transform

    if not timm.is_model(recipe.model.name):
        hint = _closest(recipe.model.name, timm.list_models())
        raise RecipeError(f"model.name: unknown timm model {recipe.model.name!r}"
                          + (f"; did you mean {hint!r}?" if hint else "; see timm.list_models()"))
    if recipe.model.aa_layer is not None:
        # lazy: the model check needs timm, which a recipe loaded for its text alone should not import
        from resnet50_recipe.model import model_name
        model_name(recipe.model)
    optimizers = timm.optim.list_optimizers()
    if recipe.optim.opt.lower() not in optimizers:
        hint = _closest(recipe.optim.opt.lower(), optimizers)
        raise RecipeError(f"optim.opt: unknown timm optimizer {recipe.optim.opt!r}"
                          + (f"; did you mean {hint!r}?" if hint else "")
                          + f"; valid: {', '.join(sorted(optimizers))}")
    for key in ("scale", "ratio"):
        lo, hi = getattr(recipe.augment, key)
        if not 0 < lo <= hi:
            raise RecipeError(f"augment.{key}: {[lo, hi]} must be two positive numbers, low first")
    if recipe.augment.auto_augment:
        try:
            create_transform(32, is_training=True, auto_augment=recipe.augment.auto_augment)
        except Exception as e:  # timm raises assorted errors for a bad policy string
            raise RecipeError(f"augment.auto_augment: invalid timm policy {recipe.augment.auto_augment!r} ({e}); "
                              "expected e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'original'") from None
    if (recipe.mixup.mixup_alpha > 0 or recipe.mixup.cutmix_alpha > 0) and recipe.train.batch_size % 2:
        raise RecipeError(f"train.batch_size: {recipe.train.batch_size} is odd; timm's Mixup/CutMix pairs each "
                          "image with its mirror in the batch and needs an even batch size")
    p = recipe.augment.progressive
    if p is not None:
        if not p.min_size <= recipe.augment.train_size:
            raise RecipeError(f"augment.progressive.min_size: {p.min_size} is above augment.train_size "
                              f"{recipe.augment.train_size}, the size the ramp ends at")
        if not p.start_epoch <= p.end_epoch <= recipe.train.epochs:
            raise RecipeError(f"augment.progressive: start_epoch {p.start_epoch} <= end_epoch {p.end_epoch} <= "
                              f"train.epochs {recipe.train.epochs} does not hold")
    if recipe.loss.bce_target_thresh is not None and recipe.loss.kind != "bce":
        raise RecipeError("loss.bce_target_thresh: only used with loss.kind: bce")
    if recipe.checkpoint.remote is not None and not re.fullmatch(r"s3://[^/]+(/.*)?", recipe.checkpoint.remote):
        raise RecipeError(f"checkpoint.remote: {recipe.checkpoint.remote!r} is not an S3 URL; expected "
                          "s3://bucket/prefix")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name):
        # The name is the default run directory runs/<name> and the remote run's folder: no path separators.
        raise RecipeError(f"name: {recipe.name!r} is not a run name; use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit")
    if recipe.train.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+",
                                                                                       recipe.train.device):
        raise RecipeError(f"train.device: invalid value {recipe.train.device!r}; expected auto, cpu, cuda, "
                          "cuda:N or mps")
