"""``run(cfg) -> results``: evaluate a checkpoint on its dataset's test (or val) split.

Writes ``evaluation.json`` and ``confusion_matrix.png`` to ``<run>/eval/<split>/`` (or
``output_dir``; for a checkpoint outside a run's ``checkpoints/`` folder, ``eval/<split>/``
next to it) and logs ``eval/<split>/*`` scalars to the run's TensorBoard directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from cnn_bench.checkpoint import load_checkpoint, model_weights
from cnn_bench.cli import in_multirun
from cnn_bench.data import build_data
from cnn_bench.errors import CnnBenchError
from cnn_bench.loop import TTA_MODES, evaluate
from cnn_bench.models.build import build_model, trained_model_config
from cnn_bench.runlog import write_json
from cnn_bench.runtime import Runtime, resolve_device

log = logging.getLogger("cnn_bench")


def format_table(classes: list[str], confusion: torch.Tensor) -> str:
    """Per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    width = max(8, *(len(c) for c in classes)) + 1
    lines = [f"{'class':<{width}} {'acc':>7} {'n':>6}   " + " ".join(f"{i:>5}" for i in range(len(classes)))]
    for i, c in enumerate(classes):
        row = confusion[i]
        n = int(row.sum())
        acc = float(row[i]) / n if n else float("nan")
        lines.append(f"{c:<{width}} {acc:7.4f} {n:6d}   " + " ".join(f"{int(v):5d}" for v in row))
    return "\n".join(lines)


def plot_confusion(classes: list[str], confusion: torch.Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = confusion.float() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def class_mismatch(found: list[str], trained: list[str]) -> str:
    """One line on how the data's classes differ from the checkpoint's (names, count, order)."""
    missing = [c for c in trained if c not in found]
    extra = [c for c in found if c not in trained]

    def names(cs: list[str]) -> str:
        return ", ".join(cs[:5]) + (f", ... ({len(cs)})" if len(cs) > 5 else "")

    parts = ([f"missing {names(missing)}"] if missing else []) \
        + ([f"not in the checkpoint {names(extra)}"] if extra else [])
    if not parts:
        parts = ["the same names in another order"]
    return (f"the dataset's {len(found)} classes do not match the checkpoint's {len(trained)} "
            f"({'; '.join(parts)}): point dataset_root at the data the model was trained on")


def _log_to_tensorboard(tb_dir: Path, split: str, m: dict, step: int) -> None:
    """``eval/<split>/{acc,loss}`` at the checkpoint's step; a run folder we may not write to
    (someone else's, read-only) costs the scalars, not the evaluation."""
    try:
        with SummaryWriter(str(tb_dir)) as tb:
            tb.add_scalar(f"eval/{split}/acc", m["acc"], step)
            tb.add_scalar(f"eval/{split}/loss", m["loss"], step)
    except OSError as e:
        log.warning("not logged to TensorBoard (%s: %s)", tb_dir, e.strerror or e)


def run(cfg: DictConfig) -> dict:
    """Evaluate ``cfg.ckpt`` on ``cfg.split`` (test | val | train); return and write the results.

    Scores the weights the run validated with (its EMA unless ``use_ema=false``) and the run's
    test-time augmentation unless ``tta`` overrides it.
    """
    if not cfg.get("ckpt"):
        raise CnnBenchError("ckpt=PATH is required, e.g. ckpt=outputs/<run>/checkpoints/best.pt")
    if cfg.get("output_dir") and in_multirun():
        raise CnnBenchError("output_dir with -m would write every job's results to one folder: "
                            "leave it unset (each checkpoint's run keeps eval/<split>/)")
    ckpt_path = Path(cfg.ckpt)
    ck = load_checkpoint(ckpt_path)
    train_cfg = OmegaConf.create(ck["config"])
    tta = cfg.get("tta") or train_cfg.trainer.get("tta", "none")
    if tta not in TTA_MODES:
        raise CnnBenchError(f"tta must be one of {', '.join(TTA_MODES)} (or null = the run's); "
                            f"got {tta!r}")
    if cfg.get("dataset_root"):
        train_cfg.dataset.root = cfg.dataset_root
    device = resolve_device(cfg.device, key="device")
    precision = cfg.precision if cfg.precision != "auto" else "fp32"
    rt = Runtime(device, precision, channels_last=False)

    # The checkpoint's mean/std are what the model saw (pretrained runs use the weights' own);
    # its class list, compared below, says more than dataset.num_classes would.
    data_cfg = OmegaConf.merge(train_cfg.dataset,
                               {"mean": ck["mean"], "std": ck["std"], "num_classes": None})
    try:
        data = build_data(data_cfg, train_cfg.augmentation, batch_size=cfg.batch_size,
                          device=device, seed=train_cfg.trainer.seed,
                          eval_batch_size=cfg.batch_size, train_for_eval=cfg.split == "train")
    except CnnBenchError as e:
        # The dataset is the checkpoint's; what evaluate.py lets a user change is its root.
        raise CnnBenchError(str(e).replace("dataset.root", "dataset_root")) from None
    if list(data.classes) != list(ck["classes"]):
        raise CnnBenchError(class_mismatch(list(data.classes), list(ck["classes"])))
    loader = getattr(data, cfg.split, None)
    if loader is None:
        have = [s for s in ("test", "val", "train") if getattr(data, s, None) is not None]
        raise CnnBenchError(f"the dataset has no '{cfg.split}' split: use "
                            + " or ".join(f"split={s}" for s in have))
    # The architecture as training resolved it (a pretrained run has the ImageNet stem even at
    # 32 px), without loading any weight file: the checkpoint's state dict comes next.
    model = build_model(trained_model_config(train_cfg.model, ck["resolution"]),
                        ck["num_classes"], ck["resolution"])
    weights, which = model_weights(ck, use_ema=cfg.get("use_ema", True))
    model.load_state_dict(weights)
    model.to(device)
    log.info("evaluating the %s weights of %s, tta=%s", "EMA" if which == "ema" else "trained",
             ckpt_path, tta)
    m = evaluate(model, loader, nn.CrossEntropyLoss(), rt, ck["num_classes"], desc=cfg.split,
                 progress=cfg.get("progress", True), tta=tta)
    confusion = m["confusion"]
    per_class = {c: (float(confusion[i, i]) / float(confusion[i].sum()) if confusion[i].sum() else None)
                 for i, c in enumerate(data.classes)}
    results = {"ckpt": str(ckpt_path), "split": cfg.split, "epoch": ck["state"]["epoch"],
               "weights": which, "tta": tta, "precision": precision, "device": device.type,
               "images": m["images"], "loss": m["loss"], "acc": m["acc"],
               "per_class_acc": per_class, "classes": list(data.classes),
               "confusion_matrix": confusion.tolist()}

    # A run's checkpoint sits in <run>/checkpoints/; one copied elsewhere is its own "run".
    parent = ckpt_path.resolve().parent
    in_run = parent.name == "checkpoints"
    run_dir = parent.parent if in_run else parent
    out = Path(cfg.output_dir) if cfg.get("output_dir") else run_dir / "eval" / cfg.split
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", results)
    plot_confusion(data.classes, confusion, out / "confusion_matrix.png",
                   f"{train_cfg.model.name} on {train_cfg.dataset.name} {cfg.split}: acc {m['acc']:.4f}")
    if in_run:  # next to the run's training curves
        _log_to_tensorboard(run_dir / "tb", cfg.split, m, ck["state"]["global_step"])
    print(format_table(list(data.classes), confusion))
    print(f"{cfg.split}: loss {m['loss']:.4f}  acc {m['acc']:.4f}  ({m['images']} images)")
    print(f"wrote {out / 'evaluation.json'} and {out / 'confusion_matrix.png'}")
    return results
