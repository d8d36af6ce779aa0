"""``python -m cnn_bench.stats dataset=imagefolder dataset.root=DIR [dataset.resolution=R]``

Measures a dataset's per-channel mean and std (train split, [0, 1] units, at the run's
resolution) and prints the YAML lines to paste into its dataset config.
"""

from __future__ import annotations

import sys

import torch

from cnn_bench.cli import check_command_line, compose_config, fail
from cnn_bench.data import build_data
from cnn_bench.data.memory import channel_stats
from cnn_bench.errors import CnnBenchError


def dataset_stats(data_cfg, device: str = "cpu", batch_size: int = 512) -> dict:
    """Mean/std over every image of the train split (loaded in order, as evaluation loads it:
    a shuffled training pass drops the last partial batch)."""
    data = build_data(data_cfg, {"name": "none"}, batch_size=batch_size, device=device, seed=0,
                      train_for_eval=True)
    loader = data.train
    if data.in_memory:
        mean, std = channel_stats(loader.images)
        n = loader.num_samples
    else:
        # Streamed batches arrive normalised with the config's mean/std: undo it, then sum.
        m = torch.tensor(data.mean, dtype=torch.float64).view(1, 3, 1, 1)
        s = torch.tensor(data.std, dtype=torch.float64).view(1, 3, 1, 1)
        total = torch.zeros(3, dtype=torch.float64)
        sq = torch.zeros(3, dtype=torch.float64)
        n = count = 0
        loader.set_epoch(0)
        for x, _ in loader:
            x = x.double().cpu() * s + m
            total += x.sum(dim=(0, 2, 3))
            sq += (x * x).sum(dim=(0, 2, 3))
            count += x.numel() // 3
            n += x.shape[0]
        mu = total / max(count, 1)
        mean = tuple(mu.tolist())
        std = tuple((sq / max(count, 1) - mu * mu).clamp_min(1e-12).sqrt().tolist())
    return {"mean": mean, "std": std, "images": n, "resolution": data.resolution,
            "num_classes": data.num_classes}


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return
    bad = [a for a in argv if "=" not in a]
    if bad:
        fail(f"'{bad[0]}' is not an override: use KEY=VALUE, e.g. dataset.resolution=64")
    # The trainer's own checks: a typo in a key or a value gets its one line here too.
    check_command_line(["augmentation=none", *argv])
    cfg = compose_config("config", ["augmentation=none", *argv])
    try:
        st = dataset_stats(cfg.dataset)
    except CnnBenchError as e:
        fail(str(e))
    print(f"# {cfg.dataset.name}: train split, {st['images']} images at {st['resolution']} px, "
          f"{st['num_classes']} classes; paste into conf/dataset/<name>.yaml or pass as overrides")
    print(f"mean: [{', '.join(f'{v:.4f}' for v in st['mean'])}]")
    print(f"std: [{', '.join(f'{v:.4f}' for v in st['std'])}]")


if __name__ == "__main__":
    main(sys.argv[1:])
