"""Frozen backbones really stay frozen, their heads really train, early stopping stops."""

from __future__ import annotations

import json
import math

import pytest
import torch

import cnn_bench.train as train_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.early_stopping import improved
from conftest import compose_config, tiny_overrides


def _train_capturing_init(monkeypatch, cfg):
    """Run training; return (initial state dict, final state dict, summary)."""
    captured = {}
    real = train_mod.build_model

    def capture(*a, **k):
        model = real(*a, **k)
        captured["init"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        captured["model"] = model
        return model

    monkeypatch.setattr(train_mod, "build_model", capture)
    summary = train_mod.run(cfg)
    final = load_checkpoint(cfg.output_dir + "/checkpoints/last.pt")["model"]
    return captured, final, summary


def _changed(init: dict, final: dict) -> set[str]:
    return {k for k in init if not torch.equal(init[k], final[k])}


def test_head_trains_only_the_classifier(tiny_folder, tmp_path, monkeypatch, caplog):
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "finetune=head", "trainer.epochs=1"))
    with caplog.at_level("WARNING", logger="cnn_bench"):
        cap, final, summary = _train_capturing_init(monkeypatch, cfg)
    # no weights were loaded: the frozen backbone is random, and the user is told so
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("finetune=head freezes") and "random" in warning
    head = cap["model"].classifier_name
    changed = _changed(cap["init"], final)
    head_keys = {k for k in cap["init"] if k.startswith(head + ".")}
    assert changed == {k for k in head_keys if "weight" in k or "bias" in k}, changed
    # BN running stats of the frozen backbone did not move (eval mode), bitwise.
    assert any("running_mean" in k for k in cap["init"])
    assert summary["trainable_params"] == sum(cap["init"][k].numel() for k in head_keys)


def test_partial_trains_last_stage_and_head(tiny_folder, tmp_path, monkeypatch):
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "finetune=partial",
                                        "finetune.unfreeze_stages=1", "trainer.epochs=1"))
    cap, final, _ = _train_capturing_init(monkeypatch, cfg)
    model = cap["model"]
    last_stage, head = model.stage_names[-1], model.classifier_name
    changed = _changed(cap["init"], final)
    owners = {k.split(".num_batches_tracked")[0] for k in changed}
    assert all(k.startswith((last_stage + ".", head + ".")) for k in owners), owners
    expected = {k for k in cap["init"] if k.startswith(last_stage + ".")
                and "num_batches_tracked" not in k}
    assert expected <= changed  # every weight and BN statistic of the last stage moved


def test_early_stopping_on_plateau(tiny_folder, tmp_path):
    # lr = 0: nothing changes, so val/acc is flat from epoch 1 and patience 2 stops at epoch 3.
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "optimizer.lr=0", "trainer.epochs=6",
                                        "trainer.early_stopping.patience=2",
                                        "augmentation=none"))
    summary = train_mod.run(cfg)
    assert summary["epochs"] == 3
    assert summary["stop_reason"].startswith("early stopping at epoch 3: val/acc did not improve")
    # the best value was first reached at epoch 1 (the message named the stopping epoch)
    assert summary["stop_reason"].endswith(f"(best {summary['best_val_acc']} at epoch 1)")


def test_early_stopping_at_the_last_epoch_is_no_stop_and_resume_rechecks_it(tiny_folder, tmp_path):
    # A stop on the last scheduled epoch was recorded as an early stop, and a resume with more
    # epochs (and more patience) then trained nothing, silently.
    flat = ["optimizer.lr=0", "augmentation=none", "trainer.limit_train_batches=1"]
    run = tmp_path / "run"
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, run, *flat, "trainer.epochs=2", "trainer.early_stopping.patience=1")))
    assert summary["epochs"] == 2 and summary["stop_reason"] is None
    # the same run stopping early at epoch 2 of 4, resumed with more patience: goes on to 4
    early = tmp_path / "early"
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, early, *flat, "trainer.epochs=4", "trainer.early_stopping.patience=1")))
    assert summary["epochs"] == 2 and summary["stop_reason"].startswith("early stopping at epoch 2")
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, early, *flat, "trainer.epochs=4", "trainer.early_stopping.patience=5",
        "trainer.resume=auto")))
    assert summary["epochs"] == 4 and summary["stop_reason"] is None
    # ran out of patience on its last epoch (no stop then); more epochs, same patience: it
    # trained one epoch past it
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, run, *flat, "trainer.epochs=4", "trainer.early_stopping.patience=1",
        "trainer.resume=auto")))
    assert summary["epochs"] == 2 and summary["stop_reason"].startswith("early stopping at epoch 2")


def test_early_stopping_on_a_loss_waits_for_it_to_fall():
    # monitor=val/loss kept the default mode max: it stopped as the loss fell ("did not improve").
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from cnn_bench import early_stopping
    from cnn_bench.config import validate
    from cnn_bench.errors import CnnBenchError

    cfg = compose_config(["trainer.early_stopping.monitor=val/loss",
                          "trainer.early_stopping.patience=1"])
    state = SimpleNamespace(es_best=None, es_wait=0, epoch=0)
    for loss in (1.1, 1.0, 0.9):
        state.epoch += 1
        assert early_stopping.check(cfg.trainer.early_stopping, {"val/loss": loss}, state) is None
    state.epoch += 1
    assert early_stopping.check(cfg.trainer.early_stopping, {"val/loss": 0.95}, state)
    with pytest.raises(CnnBenchError, match="mode=max with monitor=val/loss would stop as it "
                                            "improves: use mode=min or auto"):
        validate(OmegaConf.merge(cfg, {"trainer": {"early_stopping": {"mode": "max"}}}))
    with pytest.raises(CnnBenchError, match="trainer.grad_clip must be > 0"):
        validate(compose_config(["trainer.grad_clip=0"]))  # 0 read as off


def test_a_diverged_run_stops_and_fails_keeping_its_finite_best(tiny_folder, tmp_path):
    # lr 1e6: NaN within two epochs, yet the run finished "successfully", NaN weights could be
    # best.pt, and a chance-level argmax "accuracy" its best score.
    import re

    from cnn_bench.errors import CnnBenchError

    with pytest.raises(CnnBenchError, match=r"^training diverged at epoch \d \(train loss .*"
                                            r"non-finite (weights|outputs)\): lower optimizer.lr") as e:
        train_mod.run(compose_config(tiny_overrides(
            tiny_folder, tmp_path, "optimizer.lr=1e6", "scheduler=none", "trainer.epochs=4",
            "trainer.limit_train_batches=2")))
    at = int(re.search(r"epoch (\d)", str(e.value)).group(1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert at < 4 and summary["epochs"] == at  # stopped there
    assert summary["stop_reason"].startswith(f"training diverged at epoch {at}")
    assert summary["best_epoch"] < at
    # non-finite weights have no accuracy (their argmax gave one class's share as "final")
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["val/acc"] is None and summary["final_val_acc"] is None
    best = tmp_path / "checkpoints" / "best.pt"
    assert best.exists() == (summary["best_epoch"] >= 1)
    if best.exists():  # an earlier epoch's weights, still finite
        ck = load_checkpoint(best)
        assert ck["state"]["epoch"] == summary["best_epoch"]
        assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_finite_weights_with_overflowing_outputs_are_a_divergence(tiny_folder, tmp_path):
    # lr 1e6, one epoch: the weights are still finite but the logits overflow (val loss NaN);
    # the run finished with exit 0 and scored its NaN logits' argmax as the best accuracy.
    from cnn_bench.errors import CnnBenchError

    with pytest.raises(CnnBenchError, match=r"^training diverged at epoch 1 \(train loss .*, "
                                            r"val loss nan: non-finite outputs\)"):
        train_mod.run(compose_config(tiny_overrides(
            tiny_folder, tmp_path, "optimizer.lr=1e6", "scheduler=none", "trainer.epochs=1",
            "trainer.limit_train_batches=2")))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_epoch"] == 0 and summary["best_val_acc"] is None
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_weights_gone_non_finite_stop_the_run_unscored(tiny_folder, tmp_path, monkeypatch):
    # The outputs check above trips first at lr 1e6; here the weights themselves turn NaN
    # after epoch 2 (an update past float range), so the weights check must catch it.
    from cnn_bench.errors import CnnBenchError

    real = train_mod.train_one_epoch

    def poisoned(step_model, *a, **k):
        out = real(step_model, *a, **k)
        if a[6].epoch == 1:  # state.epoch: this was epoch 2
            with torch.no_grad():
                next(step_model.eager.parameters()).view(-1)[0] = math.nan
        return out

    monkeypatch.setattr(train_mod, "train_one_epoch", poisoned)
    with pytest.raises(CnnBenchError, match=r"^training diverged at epoch 2 \(train loss .*, "
                                            r"non-finite weights\)"):
        train_mod.run(compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=3")))
    summary = json.loads((tmp_path / "summary.json").read_text())
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["epochs"] == 2 and summary["best_epoch"] == 1 and summary["final_val_acc"] is None
    assert lines[0]["val/acc"] is not None and lines[1]["val/acc"] is None
    assert lines[1]["val_time_s"] is None  # not evaluated
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["state"]["epoch"] == 1


@pytest.mark.parametrize("value, best, mode, min_delta, expected", [
    (0.5, None, "max", 0.0, True), (0.5, 0.4, "max", 0.0, True), (0.4, 0.5, "max", 0.0, False),
    (0.41, 0.4, "max", 0.05, False), (math.nan, None, "max", 0.0, False),
    (math.nan, 0.1, "min", 0.0, False), (0.1, 0.2, "min", 0.0, True),
])
def test_improved(value, best, mode, min_delta, expected):
    assert improved(value, best, mode, min_delta) is expected


class _TapNet(torch.nn.Module):
    """Stages named by feature taps as timm's feature_info names them: ``b0``, ``b2`` (``b1``
    between the taps), then ``conv_head`` between the last tap and the classifier."""

    def __init__(self, taps: bool):
        super().__init__()
        conv = lambda: torch.nn.Conv2d(2, 2, 1)  # noqa: E731
        self.stem, self.b0, self.b1, self.b2, self.conv_head = (conv() for _ in range(5))
        self.fc = torch.nn.Linear(2, 3)
        self.classifier_name, self.stage_names = "fc", ["b0", "b2"]
        if taps:
            self.stage_taps = True


def _trainable(model) -> list[str]:
    return sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("taps", [False, True])
@pytest.mark.parametrize("stages, want", [
    (0, ["fc"]),
    # b1 sits between the taps (it belongs to b2's stage), conv_head between b2 and fc: both
    # stayed frozen when only the named modules were unfrozen
    (1, ["b1", "b2", "conv_head", "fc"]),
    (2, ["b0", "b1", "b2", "conv_head", "fc"]),  # all stages: the stem only where stages are taps
])
def test_partial_trains_everything_from_the_first_unfrozen_stage_on(taps, stages, want):
    from cnn_bench.finetune import apply_finetune

    model = _TapNet(taps)
    plan = apply_finetune(model, {"mode": "partial", "unfreeze_stages": stages})
    expected = sorted(["stem", *want] if taps and stages == 2 else want)
    assert _trainable(model) == expected
    assert sorted(plan.frozen) == sorted({"stem", "b0", "b1", "b2", "conv_head"} - set(expected))


def test_partial_on_timm_efficientnet_trains_every_block_after_the_frozen_stages():
    pytest.importorskip("timm")
    from cnn_bench.finetune import apply_finetune
    from cnn_bench.models import build_model

    model = build_model({"source": "timm", "name": "efficientnet_b0"}, 10, 32)
    assert model.stage_names[-2:] == ["model.blocks.4", "model.blocks.6"]
    apply_finetune(model, {"mode": "partial", "unfreeze_stages": 2})
    trained = {".".join(n.split(".")[1:3]) if n.startswith("model.blocks") else n.split(".")[1]
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.3", "blocks.4", "blocks.5", "blocks.6", "conv_head", "bn2",
                       "classifier"}


class _TinyViT(torch.nn.Module):
    """torchvision's ViT layout: a class token on the model, a patch conv, an encoder holding
    the position embedding, a Sequential of layers and a norm, then heads.head. As in ViT-B the
    encoder holds > 95% of the parameters, and its layers > 95% of the rest (8 px input)."""

    def __init__(self, num_classes=10, depth=12, dim=32):
        super().__init__()
        self.class_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.conv_proj = torch.nn.Conv2d(3, dim, 2, 2)
        self.encoder = torch.nn.Module()
        self.encoder.pos_embedding = torch.nn.Parameter(torch.zeros(1, 17, dim))
        self.encoder.layers = torch.nn.Sequential(*(torch.nn.Linear(dim, dim) for _ in range(depth)))
        self.encoder.ln = torch.nn.LayerNorm(dim)
        self.heads = torch.nn.Sequential()
        self.heads.head = torch.nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(len(x), -1, -1), x], 1) + self.encoder.pos_embedding
        return self.heads(self.encoder.ln(self.encoder.layers(x))[:, 0])


def test_passthrough_stages_split_a_part_holding_nearly_everything():
    # RegNet's stem + trunk_output, ViT's conv_proj + encoder: two "stages", so
    # unfreeze_stages=1 trained all of RegNet but its stem, and Swin's last "stage" was its norm.
    from cnn_bench.finetune import apply_finetune
    from cnn_bench.models import build_model
    from cnn_bench.models.external import PassthroughModel

    regnet = build_model({"source": "torchvision", "name": "regnet_x_400mf"}, 10, 32)
    assert regnet.stage_names == ["model.stem", *(f"model.trunk_output.block{i}" for i in range(1, 5))]
    vit = PassthroughModel(_TinyViT(), 10, "torchvision")
    assert vit.stage_names == ["model.conv_proj", *(f"model.encoder.layers.{i}" for i in range(12)),
                               "model.encoder.ln"]
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 10)

    apply_finetune(vit, {"mode": "partial", "unfreeze_stages": 2})
    trains = sorted(n for n, p in vit.named_parameters() if p.requires_grad)
    assert trains == ["model.encoder.layers.11.bias", "model.encoder.layers.11.weight",
                      "model.encoder.ln.bias", "model.encoder.ln.weight",
                      "model.heads.head.bias", "model.heads.head.weight"]
    # every stage unfrozen: everything trains, the tokens held by the model and encoder too (a
    # fresh model: apply_finetune only freezes)
    vit = PassthroughModel(_TinyViT(), 10, "torchvision")
    apply_finetune(vit, {"mode": "partial", "unfreeze_stages": len(vit.stage_names)})
    assert all(p.requires_grad for p in vit.parameters())
    # ResNet's layer4 (63-75% of the parameters) stays one stage
    resnet = build_model({"source": "torchvision", "name": "resnet18"}, 10, 32)
    assert resnet.stage_names == ["model.conv1", "model.bn1",
                                  *(f"model.layer{i}" for i in range(1, 5))]


@pytest.mark.parametrize("mode, stages", [("partial", 1), ("partial", 3), ("head", 0)])
def test_finetune_never_unfreezes_what_the_model_froze(mode, stages):
    # speednet's bn_scale=false and whitening stem are frozen by the model itself; unfreezing a
    # stage must leave them frozen (BN scales moved off 1 under finetune=partial before).
    from cnn_bench.finetune import apply_finetune
    from cnn_bench.models import build_model

    model = build_model({"source": "zoo", "name": "speednet_s", "bn_scale": False, "whiten": True},
                        3, 32)
    frozen_by_model = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.endswith("bn1.weight") for n in frozen_by_model) and len(frozen_by_model) > 3
    apply_finetune(model, {"mode": mode, "unfreeze_stages": stages})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not trainable & frozen_by_model
    head = model.classifier_name
    assert {n for n in trainable if not n.startswith(head + ".")} == (
        {n for n, _ in model.named_parameters() if n.startswith(tuple(
            s + "." for s in model.stage_names[len(model.stage_names) - stages:]))} - frozen_by_model
        if stages else set())


@pytest.mark.parametrize("mode", ["head", "full"])
def test_unfreeze_stages_outside_partial_is_one_line(mode):
    # finetune=head finetune.unfreeze_stages=2 trained the head alone without a word
    from cnn_bench.errors import CnnBenchError
    from cnn_bench.finetune import apply_finetune

    with pytest.raises(CnnBenchError, match="unfreeze_stages=2 applies to finetune=partial only"):
        apply_finetune(_TapNet(False), {"mode": mode, "unfreeze_stages": 2})


@pytest.mark.parametrize("precision, diverges", [("fp32", True), ("fp16", False)])
def test_a_non_finite_val_loss_is_a_divergence_except_in_fp16(tiny_folder, tmp_path, monkeypatch,
                                                            precision, diverges):
    # fp16 logits overflow past 65504 while the weights are finite and may recover: that run
    # was stopped as diverged (its bf16/fp32 overflow is not a passing state)
    from cnn_bench.errors import CnnBenchError

    real = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {**real(*a, **k), "loss": math.nan})
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1",
                                        "trainer.limit_train_batches=1", f"trainer.precision={precision}"))
    if diverges:
        with pytest.raises(CnnBenchError, match="val loss nan: non-finite outputs"):
            train_mod.run(cfg)
    else:
        assert train_mod.run(cfg)["epochs"] == 1
