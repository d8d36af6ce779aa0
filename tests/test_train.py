"""End-to-end training on a tiny generated ImageFolder: outputs, resume, evaluate, TensorBoard."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import cnn_bench.train as train_mod
from cnn_bench import evaluate as evaluate_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.errors import CnnBenchError
from cnn_bench.models.build import build_model
from conftest import compose_config, interrupt_after_first_epoch, interrupting, tiny_overrides

SUMMARY_KEYS = {"model", "dataset", "resolution", "params", "flops", "epochs", "best_val_acc",
                "best_epoch", "final_val_acc", "test_acc", "wall_time_s", "train_images_per_s",
                "peak_mem_mb", "device", "precision"}


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(tiny_overrides(tiny_folder, out))
    return out, train_mod.run(cfg)


def test_run_writes_every_output(trained):
    out, summary = trained
    for rel in ["config.yaml", ".hydra/config.yaml", ".hydra/resolved.yaml", "metrics.jsonl", "summary.json",
                "checkpoints/best.pt", "checkpoints/last.pt"]:
        assert (out / rel).is_file(), rel
    assert list((out / "tb").glob("events.out.tfevents.*"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= on_disk.keys()
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["epochs"] == 2 and summary["resolution"] == 16
    assert summary["params"] > 0 and summary["flops"] > 0
    assert summary["device"] == "cpu" and summary["precision"] == "fp32"
    # the test split scored with the best checkpoint (evaluate.py's figure on it)
    res = evaluate_mod.run(compose_config([f"ckpt={out}/checkpoints/best.pt", "split=test",
                                           "progress=false", f"output_dir={out}/eval_check"],
                                          config_name="evaluate"))
    assert res["images"] == 24 and summary["test_acc"] == pytest.approx(res["acc"])
    assert summary["test_loss"] == pytest.approx(res["loss"], rel=1e-5)
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2]
    assert lines[-1]["val/acc"] == summary["final_val_acc"]
    resolved = OmegaConf.load(out / "config.yaml")
    assert resolved.dataset.resolution == 16


def test_checkpoint_is_complete_and_weights_only(trained):
    out, _ = trained
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)
    for key in ["model", "optimizer", "scheduler", "scaler", "state", "rng", "config", "classes"]:
        assert key in ck, key
    assert isinstance(ck["config"], str) and "speednet_s" in ck["config"]
    assert ck["state"]["epoch"] == 2 and ck["state"]["best_epoch"] in (1, 2)
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_tensorboard_has_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary = trained
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss_step", "train/lr", "train/loss", "train/acc", "val/loss", "val/acc",
                "epoch_time_s", "train/images_per_s"]:
        assert tag in tags, tag
    assert len(acc.Scalars("train/loss_step")) == summary["steps"]  # every step, not sampled
    assert len(acc.Scalars("val/acc")) == 2
    # an epoch's lr is its last step's (the scheduler moves every step): the lr that step used,
    # not the next epoch's first
    step_lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(set(step_lr.values())) > 2
    for ln in lines:
        assert ln["lr"] == pytest.approx(step_lr[ln["step"]], rel=1e-6)
    # wall time so far, per epoch: beyond the epochs' own time (evaluation, start-up)
    walls = [ln["wall_time_s"] for ln in lines]
    assert walls[0] > lines[0]["epoch_time_s"] and walls[1] > walls[0] + lines[1]["epoch_time_s"]
    assert walls[-1] <= summary["wall_time_s"] and "wall_time_s" in tags
    assert "step" not in tags  # the x-axis itself is no scalar


def test_evaluate_reproduces_final_val_acc(trained):
    out, summary = trained
    cfg = compose_config([f"ckpt={out}/checkpoints/last.pt", "split=val", "device=cpu",
                          "progress=false"], config_name="evaluate")
    res = evaluate_mod.run(cfg)
    assert res["acc"] == pytest.approx(summary["final_val_acc"], abs=1e-9)
    assert (out / "eval/val/evaluation.json").is_file()
    assert (out / "eval/val/confusion_matrix.png").stat().st_size > 1000
    cm = torch.tensor(res["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == res["images"]


def test_evaluate_train_split_scores_every_plain_image(trained, tiny_folder):
    # The run trained with augmentation=basic and drop_last batches: split=train must score
    # all 72 training images as they are, whatever the batch size.
    out, _ = trained
    res = [evaluate_mod.run(compose_config([f"ckpt={out}/checkpoints/last.pt", "split=train",
                                            "device=cpu", "progress=false", f"batch_size={bs}",
                                            f"output_dir={out}/eval_train_{bs}"],
                                           config_name="evaluate"))
           for bs in (16, 7)]
    assert res[0]["images"] == res[1]["images"] == 3 * 24
    assert torch.tensor(res[0]["confusion_matrix"]).sum() == 3 * 24
    assert res[0]["loss"] == pytest.approx(res[1]["loss"], abs=1e-5)
    assert res[0]["acc"] == res[1]["acc"]


def test_resume_matches_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    extra = ["trainer.epochs=3", "augmentation=basic", "trainer.seed=3"]
    full = tmp_path / "full"
    train_mod.run(compose_config(tiny_overrides(tiny_folder, full, *extra)))

    # Interrupt a second run after its first epoch (as a pre-emption would), then resume it.
    part = tmp_path / "part"
    interrupt_after_first_epoch(
        monkeypatch, lambda: train_mod.run(compose_config(tiny_overrides(tiny_folder, part, *extra))))
    first = load_checkpoint(part / "checkpoints/last.pt")["state"]
    assert first["epoch"] == 1 and first["wall_time_s"] > 0
    summary = train_mod.run(compose_config(tiny_overrides(tiny_folder, part, *extra,
                                                          "trainer.resume=auto")))
    assert summary["epochs"] == 3
    assert summary["wall_time_s"] > first["wall_time_s"]  # counts both attempts
    a = load_checkpoint(full / "checkpoints/last.pt")["model"]
    b = load_checkpoint(part / "checkpoints/last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = (part / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == [1, 2, 3]
    # TensorBoard: the resumed run's curves have the same points as the uninterrupted run's
    # (the checkpointed epoch's record survives the purge of what followed it).
    for tag in ("val/acc", "train/loss", "train/loss_step", "train/lr"):
        assert _scalar_steps(part, tag) == _scalar_steps(full, tag), tag


def test_label_smoothing_reaches_the_training_loss_only(tiny_folder, tmp_path, monkeypatch):
    seen = {}
    real = train_mod.train_one_epoch

    def spy(model, loader, criterion, *args, **kwargs):
        seen["train"] = criterion.label_smoothing
        return real(model, loader, criterion, *args, **kwargs)

    real_eval = train_mod.evaluate

    def eval_spy(model, loader, criterion, *args, **kwargs):
        seen["eval"] = criterion.label_smoothing
        return real_eval(model, loader, criterion, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", spy)
    monkeypatch.setattr(train_mod, "evaluate", eval_spy)
    train_mod.run(compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1",
                                                "trainer.limit_train_batches=1",
                                                "augmentation.label_smoothing=0.3")))
    assert seen == {"train": 0.3, "eval": 0.0}  # validation losses stay comparable across runs


@pytest.mark.parametrize("scheduler", ["cosine", "onecycle"])
def test_resume_with_more_epochs_follows_the_longer_schedule(tiny_folder, tmp_path, monkeypatch,
                                                             scheduler):
    # The first resumed step trained at the old schedule's last lr (0 for cosine): LambdaLR
    # applies its rebuilt lambda only at the next step().
    real = train_mod.train_one_epoch
    starts = []

    def recording(model, loader, criterion, optimizer, *args, **kwargs):
        starts.append(optimizer.param_groups[0]["lr"])
        return real(model, loader, criterion, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", recording)
    base = [f"scheduler={scheduler}", "trainer.limit_train_batches=2"]
    train_mod.run(compose_config(tiny_overrides(tiny_folder, tmp_path / "three", *base,
                                                "trainer.epochs=3")))
    longer = starts[:]
    starts.clear()
    part = tmp_path / "part"
    train_mod.run(compose_config(tiny_overrides(tiny_folder, part, *base, "trainer.epochs=2")))
    train_mod.run(compose_config(tiny_overrides(tiny_folder, part, *base, "trainer.epochs=3",
                                                "trainer.resume=auto")))
    assert len(starts) == 3 and starts[2] == pytest.approx(longer[2], rel=1e-9)
    assert starts[2] > 0.05 * longer[0]


def test_resume_into_other_precision_and_layout(tiny_folder, tmp_path, monkeypatch):
    # A run saved fp32 + NCHW (a CPU run: no scaler state, NCHW momentum) resumed with fp16's
    # GradScaler and channels_last, as the auto rules on a GPU without bf16 would pick: the
    # empty scaler state was a RuntimeError, and NCHW momentum next to channels_last weights is
    # refused by the fused CUDA kernels.
    out = tmp_path / "run"
    interrupt_after_first_epoch(
        monkeypatch, lambda: train_mod.run(compose_config(tiny_overrides(tiny_folder, out))))
    assert load_checkpoint(out / "checkpoints/last.pt")["scaler"] == {}
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, out, "trainer.resume=auto", "trainer.precision=fp16",
        "trainer.channels_last=true")))
    assert summary["epochs"] == 2 and summary["precision"] == "fp16"
    assert load_checkpoint(out / "checkpoints/last.pt")["scaler"]["scale"] > 0


def test_loaded_optimizer_state_takes_the_parameters_layout():
    from cnn_bench.optim import build_optimizer, load_optimizer_state

    cfg = compose_config(["optimizer=adamw", "model=speednet_s"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10, 16)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    load_optimizer_state(opt, saved)
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.stride() != p.contiguous().stride() for p in convs)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].stride() == p.stride(), key
    torch.testing.assert_close(opt.state_dict()["state"], saved["state"])


def _scalar_steps(run, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_without_validation_best_is_the_latest_epoch(tiny_folder, tmp_path):
    # One folder of class folders and val_fraction=0: nothing to validate on, so best.pt (what
    # evaluate.py and export read) must follow the training, not stay at epoch 1.
    out = tmp_path / "noval"
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder / "train", out, "dataset.val_fraction=0", "trainer.epochs=2")))
    assert summary["best_epoch"] == 2 and summary["best_val_acc"] is None
    assert load_checkpoint(out / "checkpoints/best.pt")["state"]["epoch"] == 2


def test_resume_relinks_best_after_an_interrupted_link(tiny_folder, tmp_path, monkeypatch):
    # Validation improves every epoch; the run is interrupted after writing epoch 2's last.pt,
    # before best.pt is linked to it. Resuming must not leave best.pt at epoch 1.
    real_eval, real_link = train_mod.evaluate, train_mod.atomic_link
    evals = []

    def improving(*a, **k):
        evals.append(1)
        return {**real_eval(*a, **k), "acc": 0.1 * len(evals)}

    monkeypatch.setattr(train_mod, "evaluate", improving)
    monkeypatch.setattr(train_mod, "atomic_link", interrupting(real_link, 2))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(compose_config(tiny_overrides(tiny_folder, out)))
    assert load_checkpoint(out / "checkpoints/best.pt")["state"]["epoch"] == 1
    monkeypatch.setattr(train_mod, "atomic_link", real_link)
    summary = train_mod.run(compose_config(tiny_overrides(tiny_folder, out, "trainer.resume=auto")))
    assert summary["best_epoch"] == 2
    assert load_checkpoint(out / "checkpoints/best.pt")["state"]["epoch"] == 2


def test_resume_from_a_path_into_a_new_directory_keeps_best_and_history(tiny_folder, tmp_path,
                                                                        monkeypatch):
    # trainer.resume=<last.pt> without hydra.run.dir resumes into a new directory. Its best.pt
    # came along only when the checkpoint's own epoch was the best, so a run whose best was
    # earlier ended without best.pt (test_acc null), and its metrics started at the resumed epoch.
    real_eval, real_epoch = train_mod.evaluate, train_mod.train_one_epoch
    evals = []

    def worsening(*a, **k):  # validation peaks at epoch 1
        evals.append(1)
        return {**real_eval(*a, **k), "acc": 1.0 - 0.1 * len(evals)}

    monkeypatch.setattr(train_mod, "evaluate", worsening)
    monkeypatch.setattr(train_mod, "train_one_epoch", interrupting(real_epoch, 3))
    old = tmp_path / "old"
    with pytest.raises(KeyboardInterrupt):
        train_mod.run(compose_config(tiny_overrides(tiny_folder, old, "trainer.epochs=3")))
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    new = tmp_path / "new"
    summary = train_mod.run(compose_config(tiny_overrides(
        tiny_folder, new, "trainer.epochs=3", f"trainer.resume={old / 'checkpoints/last.pt'}")))
    assert summary["best_epoch"] == 1 and summary["test_acc"] is not None
    assert load_checkpoint(new / "checkpoints/best.pt")["state"]["epoch"] == 1
    lines = [json.loads(ln) for ln in (new / "metrics.jsonl").read_text().splitlines()]
    assert [ln["epoch"] for ln in lines] == [1, 2, 3]
    assert _scalar_steps(new, "val/acc") == [ln["step"] for ln in lines]


@pytest.mark.parametrize("change, named", [
    ("optimizer=adam", "optimizer.name: 'sgd' -> 'adam'"),
    ("model.width_mult=0.5", "model.width_mult: 1.0 -> 0.5"),
    ("finetune=head", "finetune.mode: 'full' -> 'head'"),
    ("optimizer.lr=0.05", "optimizer.lr: 0.2 -> 0.05"),
    ("scheduler=step", "scheduler.name: 'onecycle' -> 'step'"),
])
def test_resume_with_other_settings_is_one_line(trained, tiny_folder, tmp_path, change, named):
    # The first three ended in a traceback (KeyError: 'step', "different number of parameter
    # groups", a size-mismatch dump) that did not say which setting differed; the last two
    # resumed silently with the checkpoint's lr, or a mix of the two schedules.
    out, _ = trained
    cfg = compose_config(tiny_overrides(tiny_folder, tmp_path / "r", change,
                                        f"trainer.resume={out / 'checkpoints/last.pt'}"))
    with pytest.raises(CnnBenchError) as e:
        train_mod.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cannot resume from {out / 'checkpoints/last.pt'}")
    assert named in msg


def test_hparams_carry_every_overridden_key():
    # A sweep over optimizer.momentum x label smoothing logged four identical HPARAMS entries:
    # only a fixed list of keys was logged.
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from cnn_bench.config import CONF_DIR

    overrides = ["model=resnet18", "optimizer.momentum=0.5", "augmentation.label_smoothing=0.2"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    try:
        hp = train_mod._hparams(cfg, SimpleNamespace(precision="fp32"))
    finally:
        HydraConfig.instance().cfg = None
    assert hp["optimizer.momentum"] == 0.5 and hp["augmentation.label_smoothing"] == 0.2
    assert hp["model.name"] == "resnet18" and "model" not in hp  # a group: named by model.name


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_cpu_peak_memory_is_the_runs_not_the_processs(tiny_folder, tmp_path):
    # A sweep's jobs share one process: each reported the peak of every job before it.
    from cnn_bench.runtime import peak_memory_mb

    spike = torch.ones(768 * 2**20 // 4)  # 768 MiB touched, then freed (returned to the OS)
    del spike
    process_peak = peak_memory_mb(torch.device("cpu"))
    summary = train_mod.run(compose_config(tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1")))
    assert 0 < summary["peak_mem_mb"] < process_peak - 400


def test_a_new_run_into_a_run_directory_is_refused(trained, tiny_folder):
    # Rerunning into a finished run's directory without trainer.resume started over: it
    # overwrote its checkpoints and left the old TensorBoard events to mix with the new.
    out, _ = trained
    before = {p: p.read_bytes() for p in (out / "config.yaml", out / "checkpoints" / "last.pt")}
    cfg = compose_config(tiny_overrides(tiny_folder, out, "model=speednet_s", "trainer.epochs=1",
                                        "optimizer.lr=0.05"))
    with pytest.raises(CnnBenchError, match=r"already holds a run \(checkpoints/last.pt\): continue "
                                            r"it with trainer.resume=auto, or give this run its own"):
        train_mod.run(cfg)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_resuming_a_finished_run_says_there_is_nothing_to_train(tiny_folder, tmp_path, caplog):
    args = tiny_overrides(tiny_folder, tmp_path, "trainer.epochs=1", "trainer.limit_train_batches=1")
    first = train_mod.run(compose_config(args))
    with caplog.at_level("INFO", logger="cnn_bench"):
        again = train_mod.run(compose_config([*args, "trainer.resume=auto"]))
    assert "nothing to train: the run has trained 1 of trainer.epochs=1 epochs" in caplog.text
    assert again["epochs"] == first["epochs"] == 1 and again["steps"] == first["steps"]
