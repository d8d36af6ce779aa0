"""timm's ``train.py`` as a peer in ``vs_timm.py``: the launcher that runs it on any device and
times its epochs, the parser of its ``summary.csv``, and why its row cannot run (if it cannot).

train.py is not in the timm wheel: take it from a pytorch-image-models checkout.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

# `python -c TIMM_LAUNCHER <train.py> <device> <times.json> <train.py's args...>`: runs timm's
# train.py as `python train.py <args>` would (its own main(), sys.argv and sys.path[0]) after two
# fixes that change no work: the device (train.py before its `--device` flag leaves
# timm.utils.init_distributed_device to default to CUDA, and its train_one_epoch/validate take
# `device=torch.device('cuda')` defaults that main() never overrides: validate() then calls
# torch.cuda.synchronize() every batch, which raises without a GPU). It also times each
# train_one_epoch call (the training steps of an epoch, what the other runners report as train s).
TIMM_LAUNCHER = """\
import json, os, sys, time
script, device, times_file = sys.argv[1:4]
sys.argv = [script, *sys.argv[4:]]
sys.path[0] = os.path.dirname(os.path.abspath(script))
g = {'__name__': 'timm_train', '__file__': script}
with open(script) as f:
    exec(compile(f.read(), script, 'exec'), g)
import torch
dev = torch.device(device)
g['parser'].set_defaults(device=device)
for name in ('train_one_epoch', 'validate'):
    fn = g[name]
    fn.__defaults__ = tuple(dev if isinstance(d, torch.device) else d
                            for d in fn.__defaults__ or ())
train_one_epoch, epoch_s = g['train_one_epoch'], []
def timed_train_one_epoch(*a, **kw):
    t0 = time.perf_counter()
    out = train_one_epoch(*a, **kw)
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
    epoch_s.append(time.perf_counter() - t0)
    return out
g['train_one_epoch'] = timed_train_one_epoch
try:
    g['main']()
finally:
    os.makedirs(os.path.dirname(times_file), exist_ok=True)
    with open(times_file, 'w') as f:
        json.dump({'train_epoch_s': epoch_s}, f)
"""
TIMM_TIMES = "timm_train_epochs.json"


def parse_timm(out: Path) -> dict:
    """Last row of timm's ``summary.csv`` (``eval_top1`` is in percent; columns ``epoch,
    train_loss, eval_loss, eval_top1, eval_top5, lr``) and, when the launcher wrote them, the
    summed ``train_one_epoch`` times."""
    found = sorted(out.rglob("summary.csv"))
    if not found:
        raise FileNotFoundError(f"no summary.csv under {out}")
    with open(found[0]) as f:
        rows = list(csv.DictReader(f))
    times = out / TIMM_TIMES
    train_s = (sum(json.loads(times.read_text())["train_epoch_s"]) if times.exists() else None)
    return {"acc": float(rows[-1]["eval_top1"]) / 100.0 if rows else None, "train_s": train_s}


def script_has_option(script: str | Path, option: str) -> bool:
    """Whether timm's train.py defines ``option`` (its argparse calls, read as text); a script
    that cannot be read counts as a current one (it will fail on its own, with a log)."""
    try:
        text = Path(script).expanduser().read_text()
    except OSError:
        return True
    return f"'{option}'" in text or f'"{option}"' in text


def timm_missing(script: str | None) -> str | None:
    """Why the timm row cannot run, or ``None`` when it can."""
    if not script:
        return "no timm train.py given (--timm-train-script or $TIMM_TRAIN_SCRIPT)"
    if not Path(script).expanduser().is_file():
        return f"timm train.py not found at {script}"
    if importlib.util.find_spec("timm") is None:
        return "timm is not installed (pip install timm)"
    return None
