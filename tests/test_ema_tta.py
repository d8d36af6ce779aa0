"""EMA of the weights (``trainer.ema_decay``) and test-time augmentation (``trainer.tta``).

Unit tests check the arithmetic on hand-built models (the EMA against its closed form after
each step, flip TTA against the two passes it averages); trainer tests on the tiny generated
folder check that validation, checkpoints, resume, ``evaluate.py`` and export use them.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import cnn_bench.train as train_mod
from cnn_bench import evaluate as evaluate_mod
from cnn_bench.checkpoint import load_checkpoint
from cnn_bench.config import validate
from cnn_bench.ema import ModelEma
from cnn_bench.errors import CnnBenchError
from cnn_bench.export import export
from cnn_bench.loop import StepModel, eval_logits, evaluate, translate
from cnn_bench.runtime import Runtime
from conftest import (compose_config, interrupt_after_first_epoch, sgd_steps, small_bn_net,
                      tiny_overrides)

CPU = Runtime(torch.device("cpu"), "fp32", False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _sgd_steps(model: nn.Module, ema: ModelEma, n: int) -> list[dict]:
    """``n`` SGD steps on seeded random batches, each followed by ``ema.update``; return the raw
    state dict after each step."""
    states = []
    for step in sgd_steps(model, n):
        ema.update(step)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


# --- EMA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("decay,warmup", [(0.5, False), (0.75, False), (0.9, True)])
def test_ema_matches_the_closed_form_after_every_step(decay, warmup):
    model = small_bn_net()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEma(model, decay, warmup=warmup)
    raw = _sgd_steps(model, ema, 3)
    expected = init
    for t, r in enumerate(raw):
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay  # 0.1, 0.18, 0.25 with warm-up
        expected = {k: (d * expected[k] + (1 - d) * r[k]) if r[k].is_floating_point() else r[k]
                    for k in r}
    got = ema.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7, msg=k)
        if got[k].is_floating_point():
            assert not torch.equal(got[k], raw[-1][k]), k  # it really is an average
    assert int(got["1.num_batches_tracked"]) == 3  # integer buffers are copied
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


def test_ema_decay_zero_is_the_raw_model():
    model = small_bn_net()
    ema = ModelEma(model, 0.0, warmup=True)
    raw = _sgd_steps(model, ema, 3)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, raw[-1][k]), k


def test_ema_skips_frozen_parameters_and_never_syncs(monkeypatch):
    model = small_bn_net()
    model[0].requires_grad_(False)  # a frozen layer, as finetune=head/partial leaves them
    ema = ModelEma(model, 0.9)
    assert not any(t is model[0].weight for t in ema._avg_src)
    syncs = []
    for name in ("item", "tolist", "cpu", "__bool__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda t, *a, _o=orig, **k: (syncs.append(1), _o(t, *a, **k))[1])
    ema.update(0)
    monkeypatch.undo()
    assert syncs == []
    _sgd_steps(model, ema, 2)
    assert torch.equal(ema.module[0].weight, model[0].weight)  # frozen: equal in both copies
    assert not torch.equal(ema.module[5].weight, model[5].weight)


def test_bad_ema_and_tta_settings_are_one_line_errors():
    with pytest.raises(CnnBenchError, match=r"trainer.tta must be one of none, flip, flip_translate; got 'flop'"):
        validate(compose_config(["trainer.tta=flop"]))
    with pytest.raises(CnnBenchError, match=r"trainer.ema_decay must be in \[0, 1\)"):
        validate(compose_config(["trainer.ema_decay=1.0"]))
    with pytest.raises(CnnBenchError, match=r"trainer.ema_decay must be >= 0"):
        validate(compose_config(["trainer.ema_decay=-0.1"]))
    validate(compose_config(["trainer.ema_decay=0.99", "trainer.tta=flip"]))
    validate(compose_config(["trainer.tta=flip_translate"]))


# --- flip TTA ------------------------------------------------------------------------------

class LeftHalf(nn.Module):
    """Logits = per-channel means of the image's left half (3 channels = 3 classes), so the
    flipped pass sees the (mirrored) right half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : x.shape[-1] // 2].mean(dim=(2, 3))


def _halves_batch():
    """8 images whose left half says class ``left`` (value 1) and right half class ``right``
    (value 3, so it wins the average); labels = ``right``. Half the images agree."""
    left = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    right = torch.tensor([0, 1, 2, 0, 2, 0, 1, 2])
    x = torch.zeros(8, 3, 6, 6)
    for i in range(8):
        x[i, left[i], :, :3] = 1.0
        x[i, right[i], :, 3:] = 3.0
    x += 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return x, right


def test_flip_tta_averages_the_two_passes_exactly():
    model = LeftHalf()
    x, _ = _halves_batch()
    plain, mirrored = model(x), model(x.flip(3))
    assert torch.equal(eval_logits(model, x, "flip"), (plain + mirrored) / 2)
    assert torch.equal(eval_logits(model, x, "none"), plain)
    # The mirrored pass really sees the right half (mean over the same pixels, reversed order).
    torch.testing.assert_close(mirrored, x[..., 3:].mean(dim=(2, 3)))


def test_evaluate_with_flip_tta_scores_the_averaged_logits():
    model = LeftHalf()
    x, y = _halves_batch()
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    flip = evaluate(model, loader, nn.CrossEntropyLoss(), CPU, 3, tta="flip")
    plain = evaluate(StepModel(model, compile=False), loader, nn.CrossEntropyLoss(), CPU, 3)
    avg = (model(x) + model(x.flip(3))) / 2
    assert flip["acc"] == 1.0 and plain["acc"] == 0.5  # left halves agree with the labels half the time
    assert flip["loss"] == pytest.approx(nn.functional.cross_entropy(avg, y).item(), rel=1e-6)
    assert plain["loss"] == pytest.approx(nn.functional.cross_entropy(model(x), y).item(), rel=1e-6)
    assert torch.equal(flip["confusion"].diag(), torch.bincount(y, minlength=3))


def test_translate_shifts_by_one_pixel_with_reflected_borders():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    down, up = translate(x, 1), translate(x, -1)
    assert down.shape == up.shape == x.shape
    assert torch.equal(down[..., 1:, 1:], x[..., :-1, :-1])  # content moved down and right
    assert torch.equal(up[..., :-1, :-1], x[..., 1:, 1:])
    assert torch.equal(down[..., 0, 1:], x[..., 1, :-1])  # the new top row reflects row 1
    assert torch.equal(up[..., -1, :-1], x[..., -2, 1:])
    cl = x.contiguous(memory_format=torch.channels_last)
    assert translate(cl, 1).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(translate(cl, 1), down)


class Corner(nn.Module):
    """Logits = the top-left pixel's 3 channels: every shift and mirror sees another pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0] * 1.0


def test_flip_translate_tta_averages_the_six_passes():
    model = Corner()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))

    def mirror(z):
        return (model(z) + model(z.flip(3))) / 2

    shifted = (mirror(translate(x, 1)) + mirror(translate(x, -1))) / 2
    want = (mirror(x) + shifted) / 2
    torch.testing.assert_close(eval_logits(model, x, "flip_translate"), want)
    # The six passes see six different pixels: (0,0), (0,5), (1,1)->(0,0) reflected, ...
    torch.testing.assert_close(want, (x[..., 0, 0] + x[..., 0, 5]) / 4
                               + (x[..., 1, 1] + x[..., 1, 4] + x[..., 1, 1] + x[..., 1, 4]) / 8)
    assert not torch.allclose(want, eval_logits(model, x, "flip"))
    with pytest.raises(ValueError, match="flip_translate"):
        eval_logits(model, x, "flop")


# --- through the trainer -------------------------------------------------------------------

def _train(tiny_folder, out, *extra: str) -> dict:
    return train_mod.run(compose_config(tiny_overrides(tiny_folder, out, *extra)))


def _evaluate(out, *extra: str) -> dict:
    cfg = compose_config([f"ckpt={out}/checkpoints/last.pt", "split=val", "device=cpu",
                          "progress=false", f"output_dir={out}/eval_{len(extra)}", *extra],
                         config_name="evaluate")
    return evaluate_mod.run(cfg)


def test_ema_decay_zero_trains_exactly_like_no_ema(tiny_folder, tmp_path):
    """EMA with decay 0 is the raw model: same metrics bit for bit, so the EMA path changes
    nothing else in the run. (That validation scores the EMA copy is shown by
    test_run_with_ema_and_flip_is_reproduced_by_evaluate_and_export: here both copies agree.)"""
    short = ["trainer.epochs=2", "trainer.limit_train_batches=2"]
    plain = _train(tiny_folder, tmp_path / "plain", *short)
    zero = _train(tiny_folder, tmp_path / "zero", *short, "trainer.ema_decay=0.0")
    assert zero["ema_decay"] == 0.0 and plain["ema_decay"] is None
    for key in ("final_val_acc", "final_val_loss", "final_train_loss", "test_acc", "test_loss"):
        assert zero[key] == plain[key], key
    ck = torch.load(tmp_path / "zero/checkpoints/last.pt", weights_only=True)
    assert "model_ema" not in load_checkpoint(tmp_path / "plain/checkpoints/last.pt")
    for k, v in ck["model"].items():
        assert torch.equal(ck["model_ema"][k], v), k


def test_run_with_ema_and_flip_is_reproduced_by_evaluate_and_export(tiny_folder, tmp_path):
    out = tmp_path / "run"
    s = _train(tiny_folder, out, "trainer.ema_decay=0.8", "trainer.ema_warmup=false",
               "trainer.tta=flip")
    assert s["tta"] == "flip" and s["ema_decay"] == 0.8
    ck = torch.load(out / "checkpoints/last.pt", weights_only=True)  # plain types + tensors
    assert ck["model_ema"].keys() == ck["model"].keys()
    assert all(not torch.equal(ck["model_ema"][k], v)
               for k, v in ck["model"].items() if k.endswith("weight"))

    res = _evaluate(out)  # the run's settings: EMA weights, flip TTA
    assert res["weights"] == "ema" and res["tta"] == "flip"
    assert res["acc"] == s["final_val_acc"]
    assert res["loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    raw = _evaluate(out, "use_ema=false")
    no_tta = _evaluate(out, "tta=none")
    crops = _evaluate(out, "tta=flip_translate")
    assert raw["weights"] == "raw" and no_tta["tta"] == "none"
    assert crops["tta"] == "flip_translate"
    assert raw["loss"] != pytest.approx(res["loss"], rel=1e-5)
    assert no_tta["loss"] != pytest.approx(res["loss"], rel=1e-5)
    assert crops["loss"] != res["loss"]  # six passes, not two (a near-uniform tiny model)

    ema_pt = export(out / "checkpoints/last.pt", "pt", tmp_path / "ema.pt")
    raw_pt = export(out / "checkpoints/last.pt", "pt", tmp_path / "raw.pt", use_ema=False)
    for path, key in ((ema_pt, "model_ema"), (raw_pt, "model")):
        weights = torch.load(path, weights_only=True)
        for k, v in ck[key].items():
            assert torch.equal(weights[k], v), (key, k)


def test_resume_with_ema_matches_uninterrupted_run(tiny_folder, tmp_path, monkeypatch):
    extra = ["trainer.epochs=3", "augmentation=basic", "trainer.seed=3", "trainer.ema_decay=0.9",
             "trainer.limit_train_batches=2"]
    steps = []  # the update numbers the trainer passes (they set the warm-up decay)
    real_update = ModelEma.update
    monkeypatch.setattr(ModelEma, "update", lambda self, step: (steps.append(step),
                                                                 real_update(self, step))[1])
    full = tmp_path / "full"
    _train(tiny_folder, full, *extra)
    assert steps == list(range(6))  # 3 epochs x 2 steps, one update after each

    part = tmp_path / "part"
    steps.clear()
    interrupt_after_first_epoch(monkeypatch, lambda: _train(tiny_folder, part, *extra))
    assert load_checkpoint(part / "checkpoints/last.pt")["state"]["epoch"] == 1
    _train(tiny_folder, part, *extra, "trainer.resume=auto")
    assert steps == list(range(6))  # the resumed attempt continues the count at 2
    a = load_checkpoint(full / "checkpoints/last.pt")
    b = load_checkpoint(part / "checkpoints/last.pt")
    for key in ("model", "model_ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    val = [[json.loads(ln)["val/loss"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
           for d in (full, part)]
    assert val[0] == val[1] and len(val[0]) == 3
