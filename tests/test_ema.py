"""The weights' moving average (training/ema.py) and what the training script does with it: the math against a hand
computation, the saved and evaluated weights, bit-exact resume, bad values. Tiny runs as in test_train.py."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import run as _run
from tiny_run import write_config as _config

from modeling_detr_custom import DetrCustomForObjectDetection
from training import build as build_module
from training import train
from training.ema import EMA_FILE, WeightEma, check_ema_arguments, ema_decay_at

ONE_PROCESS = SimpleNamespace(num_processes=1)


def test_ema_follows_a_hand_computation_of_rt_detr_ramp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = WeightEma(model, decay=0.9, warmup_steps=2)
    keys = ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var")
    expected = {k: model.state_dict()[k].double().clone() for k in keys}   # ema_0: the initial weights
    for t in range(1, 5):
        with torch.no_grad():   # an "optimizer step" and a training forward (BatchNorm statistics move)
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(8, 3))
        ema.step(model, ONE_PROCESS)
        d = 0.9 * (1 - math.exp(-t / 2))   # RT-DETR: decay * (1 - exp(-updates / warmups))
        assert ema_decay_at(t, decay=0.9, warmup_steps=2) == pytest.approx(d, rel=1e-15)
        for k in keys:
            expected[k] = d * expected[k] + (1 - d) * model.state_dict()[k].double()
            assert torch.allclose(ema.module.state_dict()[k].double(), expected[k], rtol=1e-6, atol=1e-7), (t, k)
        assert ema.module.state_dict()["1.num_batches_tracked"] == t   # integer buffers: copied
    assert ema.updates == 4 and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema_decay_at(3, decay=0.9, warmup_steps=0) == 0.9   # no ramp


@pytest.mark.parametrize("decay, warmup, message", [
    (1.0, 2000, r"--ema_decay=1.0 is outside \[0, 1\)"), (-0.5, 2000, r"--ema_decay=-0.5 is outside \[0, 1\)"),
    (0.99, -1, r"--ema_warmup_steps=-1 is negative")])
def test_bad_ema_values_are_refused(decay, warmup, message):
    with pytest.raises(ValueError, match=message):
        check_ema_arguments(decay, warmup)
    for off in (None, 0.0):
        check_ema_arguments(off, 2000)


def test_bad_ema_decay_fails_before_training(tmp_path, data_dir, monkeypatch):
    def load_data(*args, **kwargs):
        raise AssertionError("the run got past its argument checks")

    monkeypatch.setattr(build_module, "load_data", load_data)
    with pytest.raises(ValueError, match=r"--ema_decay=1.5 is outside \[0, 1\).*0 to turn EMA off"):
        _run(_config(tmp_path, data_dir, ema_decay=1.5))


def _tensors(path) -> dict:
    return load_file(path)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_resumes_bit_exactly_and_is_what_is_saved_and_evaluated(tmp_path, data_dir):
    common = dict(eval_steps=3, save_steps=3, save_total_limit=2, seed=7, ema_decay=0.9, ema_warmup_steps=2)
    _run(_config(tmp_path / "straight", data_dir, max_steps=6, **common))
    _run(_config(tmp_path / "resumed", data_dir, max_steps=3, **common))
    _run(_config(tmp_path / "resumed", data_dir, max_steps=6, resume_from_checkpoint="latest", **common))
    straight, resumed = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    for name in ("last/model.safetensors", f"checkpoint-6/{EMA_FILE}", "checkpoint-6/model.safetensors"):
        assert _same(_tensors(straight / name), _tensors(resumed / name)), name
    histories = [json.loads((run / "metrics.json").read_text()) for run in (straight, resumed)]
    for metrics in histories:
        for record in metrics["train_history"]:
            record.pop("elapsed_s")
    assert histories[0]["train_history"] == histories[1]["train_history"]
    assert histories[0]["eval_history"] == histories[1]["eval_history"]
    assert [r["step"] for r in histories[1]["eval_history"]] == [3, 6]
    # last/ holds the average (as a loadable model), not the trained weights of the same step
    average = load_file(straight / "checkpoint-6" / EMA_FILE)
    last = _tensors(straight / "last" / "model.safetensors")
    assert last.keys() <= average.keys() and all(torch.equal(last[k], average[k]) for k in last)
    trained = _tensors(straight / "checkpoint-6" / "model.safetensors")
    assert not all(torch.equal(last[k], trained[k]) for k in last)
    metrics = histories[0]
    assert metrics["run"]["ema"] == {"decay": 0.9, "warmup_steps": 2, "updates": 6}
    card = (straight / "last" / "README.md").read_text()
    assert "exponential moving average of the trained weights (decay 0.9, warm-up 2 steps)" in card
    best_step = metrics["best"]["step"]
    if best_step == 6:   # best/ is the average at its step
        assert _same(_tensors(straight / "best" / "model.safetensors"), last)
    # the evaluation at step 6 measured last/ (the average): the same evaluation of the loaded folder gives its AP
    model_args, data_args, args = train.parse_args(["--config", str(_config(tmp_path / "check", data_dir, **common))])
    setup = train.build(model_args, data_args, args)
    saved = DetrCustomForObjectDetection.from_pretrained(straight / "last").state_dict()
    setup.accelerator.unwrap_model(setup.model).load_state_dict(saved)
    setup.ema = None
    recorded = {k: v for k, v in metrics["eval_history"][-1].items() if k not in ("step", "epoch")}
    assert train.evaluate(setup) == recorded


def test_zero_decay_is_off_and_resuming_with_ema_needs_the_average(tmp_path, data_dir):
    _run(_config(tmp_path, data_dir, max_steps=1, eval_steps=100, ema_decay=0.0))
    run = tmp_path / "run"
    assert not (run / "checkpoint-1" / EMA_FILE).exists()
    assert json.loads((run / "metrics.json").read_text())["run"]["ema"] is None
    with pytest.raises(ValueError, match=r"checkpoint-1 holds no average of the weights \(ema\.safetensors\): it was "
                                         r"saved with EMA off\. Resume with the run's own setting \(--ema_decay 0\)"):
        _run(_config(tmp_path, data_dir, max_steps=2, ema_decay=0.9, resume_from_checkpoint="latest"))
