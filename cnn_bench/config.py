"""Where the config tree lives, and checks on the public keys that YAML alone cannot type."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from cnn_bench.early_stopping import MONITORS as EARLY_STOPPING_MONITORS
from cnn_bench.early_stopping import mode as early_stopping_mode
from cnn_bench.errors import CnnBenchError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# ${cnn_bench.if_null:A,B}: A unless it is null or empty, else B (OmegaConf's oc.select returns a null).
# conf/config.yaml's hydra.run.dir follows output_dir with it, so Hydra's .hydra/ and train.log
# land in the run's own folder.
if not OmegaConf.has_resolver("cnn_bench.if_null"):
    OmegaConf.register_new_resolver("cnn_bench.if_null", lambda a, b: b if a in (None, "") else a)


def group_options(group: str) -> list[str]:
    """A config group's options (``conf/<group>/*.yaml`` names), sorted; none for a non-group."""
    return sorted(f.stem for f in (CONF_DIR / group).glob("*.yaml"))

_INT, _FLOAT, _BOOL, _STR, _NONE = "an integer", "a number", "true or false", "a string", "null"

# key -> (accepted kinds, choices or None, minimum or None)
_SCHEMA: dict[str, tuple[tuple[str, ...], tuple | None, float | None]] = {
    "trainer.epochs": ((_INT,), None, 1),
    "trainer.batch_size": ((_INT,), None, 1),
    "trainer.eval_batch_size": ((_INT, _NONE), None, 1),
    "trainer.device": ((_STR,), None, None),
    "trainer.precision": ((_STR,), ("auto", "fp32", "bf16", "fp16"), None),
    "trainer.channels_last": ((_STR, _BOOL), ("auto", True, False), None),
    "trainer.compile": ((_BOOL,), None, None),
    "trainer.compile_mode": ((_STR,), ("default", "reduce-overhead", "max-autotune",
                                       "max-autotune-no-cudagraphs"), None),
    "trainer.seed": ((_INT,), None, 0),
    "trainer.resume": ((_STR, _NONE), None, None),
    "trainer.limit_train_batches": ((_INT, _NONE), None, 1),
    "trainer.limit_val_batches": ((_INT, _NONE), None, 1),
    "trainer.grad_clip": ((_FLOAT, _NONE), None, 0),
    "trainer.log_every_n_steps": ((_INT,), None, 1),
    "trainer.ema_decay": ((_FLOAT, _NONE), None, 0),
    "trainer.ema_warmup": ((_BOOL,), None, None),
    "trainer.lookahead_every": ((_INT, _NONE), None, 1),
    "trainer.lookahead_decay": ((_FLOAT,), None, 0),
    "trainer.tta": ((_STR,), ("none", "flip", "flip_translate"), None),
    "dataset.root": ((_STR, _NONE), None, None),
    "dataset.resolution": ((_INT,), None, 8),
    "dataset.val_fraction": ((_FLOAT,), None, 0),
    "dataset.num_classes": ((_INT, _NONE), None, 1),
    "dataset.in_memory": ((_STR, _BOOL), ("auto", True, False), None),
    "dataset.max_memory_gb": ((_FLOAT,), None, 0),
    "dataset.cache_dir": ((_STR, _NONE), None, None),
    "dataset.num_workers": ((_INT,), None, 0),
    "dataset.split_seed": ((_INT,), None, 0),
    "augmentation.crop_padding": ((_FLOAT,), None, 0),
    "augmentation.padding_mode": ((_STR,), ("constant", "reflect"), None),
    "augmentation.hflip": ((_FLOAT,), None, 0),             # <= 1, checked below
    "augmentation.hflip_alternate": ((_BOOL,), None, None),
    "augmentation.brightness": ((_FLOAT,), None, 0),
    "augmentation.contrast": ((_FLOAT,), None, 0),
    "augmentation.saturation": ((_FLOAT,), None, 0),
    "augmentation.rotation": ((_FLOAT,), None, 0),
    "augmentation.translate": ((_FLOAT,), None, 0),
    "augmentation.label_smoothing": ((_FLOAT,), None, 0),   # <= 1, checked below
    "model.width_mult": ((_FLOAT,), None, 0.01),
    "model.bn_momentum": ((_FLOAT, _NONE), None, 0),
    "model.stem": ((_STR,), ("auto", "cifar", "imagenet"), None),
    "model.pretrained": ((_BOOL,), None, None),
    "model.weights": ((_STR, _NONE), None, None),
    "model.dropout": ((_FLOAT,), None, 0),                  # <= 1, checked below
    "model.zero_init_residual": ((_BOOL,), None, None),
    "model.lrn": ((_BOOL,), None, None),
    "model.groups": ((_INT,), None, 1),
    "model.negative_slope": ((_FLOAT,), None, None),
    "model.backbone": ((_STR,), None, None),
    "model.head": ((_STR,), None, None),
    "model.num_layers": ((_INT,), None, 1),
    "model.feature_size": ((_INT,), None, 1),
    "model.whiten": ((_BOOL,), None, None),
    "model.dirac": ((_BOOL,), None, None),
    "model.bn_scale": ((_BOOL,), None, None),
    "optimizer.lr": ((_FLOAT,), None, 0),
    "optimizer.weight_decay": ((_FLOAT,), None, 0),
    "optimizer.head_lr_mult": ((_FLOAT,), None, 0),
    "optimizer.norm_bias_lr_mult": ((_FLOAT,), None, 0),
    "optimizer.momentum": ((_FLOAT,), None, 0),
    "optimizer.nesterov": ((_BOOL,), None, None),
    "optimizer.decay_norm_and_bias": ((_BOOL,), None, None),
    "scheduler.warmup_epochs": ((_FLOAT,), None, 0),
    "scheduler.warmup_start_factor": ((_FLOAT,), None, 0),
    "scheduler.min_lr_factor": ((_FLOAT,), None, 0),
    "scheduler.step_epochs": ((_FLOAT,), None, None),       # > 0, checked below
    "scheduler.gamma": ((_FLOAT,), None, 0),
    "scheduler.pct_start": ((_FLOAT,), None, None),         # in (0, 1), checked below
    "scheduler.div_factor": ((_FLOAT,), None, None),        # > 0, checked below
    "scheduler.final_div_factor": ((_FLOAT,), None, None),  # > 0, checked below
    "trainer.early_stopping.monitor": ((_STR,), EARLY_STOPPING_MONITORS, None),
    "trainer.early_stopping.mode": ((_STR,), ("auto", "max", "min"), None),
    "trainer.early_stopping.patience": ((_INT, _NONE), None, 1),
    "trainer.early_stopping.min_delta": ((_FLOAT,), None, 0),
    "finetune.mode": ((_STR,), ("full", "head", "partial"), None),
    "finetune.unfreeze_stages": ((_INT,), None, 0),
    "output_dir": ((_STR, _NONE), None, None),              # both configs
    # evaluate.py's own keys (conf/evaluate.yaml; the training config has none of them)
    "split": ((_STR,), ("test", "val", "train"), None),
    "batch_size": ((_INT,), None, 1),
    "precision": ((_STR,), ("auto", "fp32", "bf16", "fp16"), None),
    "use_ema": ((_BOOL,), None, None),
}
# Values that must be strictly positive (``minimum`` above is inclusive).
_POSITIVE = ("scheduler.step_epochs", "scheduler.div_factor", "scheduler.final_div_factor",
             "trainer.grad_clip")  # a clip of 0 would read as off (null is off)
# Probabilities: at most 1.
_AT_MOST_ONE = ("augmentation.hflip", "augmentation.label_smoothing", "model.dropout")
# key -> (an example value, null allowed, each number in [0, 1)): lists of so many numbers
_NUMBER_LISTS = {"dataset.mean": ("[0.485,0.456,0.406]", True, False),
                 "dataset.std": ("[0.229,0.224,0.225]", True, False),
                 "augmentation.scale": ("[0.9,1.1]", False, False),
                 "optimizer.betas": ("[0.9,0.999]", False, True)}


def _kind(value: Any) -> str:
    if value is None:
        return _NONE
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _INT
    if isinstance(value, float):
        return _FLOAT
    return _STR


def validate(cfg: DictConfig) -> None:
    """Raise a one-line ``CnnBenchError`` for a public key of the wrong type or out of range."""
    for key, (kinds, choices, minimum) in _SCHEMA.items():
        try:
            value = OmegaConf.select(cfg, key, default="__absent__")
        except InterpolationResolutionError:  # ${hydra:...} outside a Hydra run: the run's to check
            continue
        if value == "__absent__":
            continue
        kind = _kind(value)
        ok = kind in kinds or (kind == _INT and _FLOAT in kinds)
        if not ok:
            want = " or ".join(kinds)
            raise CnnBenchError(f"{key} must be {want}, got {value!r}")
        if choices is not None and value not in choices:
            raise CnnBenchError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        if minimum is not None and kind in (_INT, _FLOAT) and value < minimum:
            raise CnnBenchError(f"{key} must be >= {minimum}, got {value}")
    for key in _POSITIVE:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not value > 0:
            raise CnnBenchError(f"{key} must be > 0, got {value}")
    for key in _AT_MOST_ONE:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value > 1:
            raise CnnBenchError(f"{key} must be in [0, 1], got {value}")
    for key, (example, nullable, unit) in _NUMBER_LISTS.items():
        value = OmegaConf.select(cfg, key, default="__absent__")
        if value == "__absent__" or (value is None and nullable):
            continue
        n = example.count(",") + 1
        if not (OmegaConf.is_list(value) and len(value) == n
                and all(_kind(v) in (_INT, _FLOAT) for v in value)
                and (not unit or all(0 <= v < 1 for v in value))):
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise CnnBenchError(f"{key} must be a list of {n} numbers"
                                f"{' in [0, 1)' if unit else ''}"
                                f"{' (or null)' if nullable else ''}, e.g. {key}={example}; "
                                f"got {shown!r}")
    pct_start = OmegaConf.select(cfg, "scheduler.pct_start", default=0.5)
    if not 0 < pct_start < 1:
        raise CnnBenchError(f"scheduler.pct_start must be in (0, 1), got {pct_start}")
    val_fraction = OmegaConf.select(cfg, "dataset.val_fraction", default=0.0)
    if not 0 <= val_fraction < 1:
        raise CnnBenchError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
    ema_decay = OmegaConf.select(cfg, "trainer.ema_decay", default=None)
    if ema_decay is not None and not ema_decay < 1:  # 1 would never move from the initial weights
        raise CnnBenchError(f"trainer.ema_decay must be in [0, 1) (or null = off), got {ema_decay}")
    es = OmegaConf.select(cfg, "trainer.early_stopping", default=None)
    if es is not None and es.get("mode", "auto") != "auto" \
            and es.get("mode") != early_stopping_mode(es.get("monitor", "val/acc"), "auto"):
        raise CnnBenchError(
            f"trainer.early_stopping.mode={es.mode} with monitor={es.monitor} would stop as it "
            f"improves: use mode={early_stopping_mode(es.monitor, 'auto')} or auto")
    la_decay = OmegaConf.select(cfg, "trainer.lookahead_decay", default=0.0)
    if not la_decay < 1:  # 1 would freeze the slow weights at the end of the run
        raise CnnBenchError(f"trainer.lookahead_decay must be in [0, 1), got {la_decay}")


def run_dir_in_use(cfg: DictConfig, out: str | Path) -> str | None:
    """Why a new run cannot go into ``out``, or ``None``: a directory that holds a run is
    continued (``trainer.resume``), never started over (that overwrote its checkpoints and mixed
    two runs' TensorBoard events)."""
    if OmegaConf.select(cfg, "trainer.resume") not in (None, "", False):
        return None
    out = Path(out)
    held = [p for p in (out / "checkpoints" / "last.pt", out / "checkpoints" / "best.pt") if p.exists()]
    if not held:
        return None
    return (f"{out} already holds a run ({held[0].relative_to(out)}): continue it with "
            f"trainer.resume=auto, or give this run its own directory (hydra.run.dir=... or "
            f"output_dir=...)")
