"""The scripts end to end on the smoke preset: training, resume, interruption, NaN,
sampling, figures, and a one-line error with exit code 2 for every bad input."""
import contextlib
import functools
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import benchmark
import config
import data
import helper
import loadmodel
import main
import runs
import training
from conftest import REPO, no_eager_fallback
from helper import Schedule
from model import Model


def smoke_config(mnist_root, **training):
    cfg = config.get_config("smoke")
    return config.merge_config(cfg, {"data": {"root": mnist_root}, "training": training})


def run_script(*args, timeout=120, cwd=REPO):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def run_in_process(*args):
    """Run a script as `python SCRIPT ARGS` does, its main() under runs.run, but in this process
    (no interpreter start-up): returns (exit code, stdout, stderr) as run_script does."""
    script = importlib.import_module(args[0].removesuffix(".py"))
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runs.run(lambda: script.main(list(args[1:])))
        except SystemExit as exit:
            code = exit.code
    return code, stdout.getvalue(), stderr.getvalue()


def test_main_writes_checkpoint_samples_and_loss_curve(trained):
    for name in ["ckpt.pt", "ema.pt", "samples.png", "loss.png", "samples_step4.png", "samples_step8.png"]:
        assert (trained / name).stat().st_size > 0
    state = torch.load(trained / "ckpt.pt", weights_only=True)
    assert state["step"] == 8 and len(state["losses"]) == 8 and state["config"]["training"]["steps"] == 8
    weights = torch.load(trained / "ema.pt", weights_only=True)
    assert weights.keys() == runs.SAMPLING_KEYS and weights["step"] == 8
    for name, value in state["ema"].items():
        assert torch.equal(weights["ema"][name], value)


def test_a_weights_file_samples_but_cannot_be_resumed(trained, tmp_path):
    loadmodel.main([str(trained / "ema.pt"), "--num-samples", "3", "--seed", "7", "--out", str(tmp_path / "ema")])
    loadmodel.main([str(trained / "ckpt.pt"), "--num-samples", "3", "--seed", "7", "--out", str(tmp_path / "ckpt")])
    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("ema", "ckpt"))
    assert np.array_equal(a, b)
    code, _, stderr = run_in_process("main.py", "--resume", str(trained / "ema.pt"))
    assert_one_line_error(code, stderr, "weights-only files cannot be resumed")


def test_shipped_weights_load_weights_only_and_sample_when_there_is_no_run(tmp_path, monkeypatch):
    state = torch.load(runs.PRETRAINED, map_location="cpu", weights_only=True)
    assert state.keys() == runs.SAMPLING_KEYS
    shipped, default = config.checkpoint_config(state), config.get_config("cpu")
    assert all(shipped[section] == default[section] for section in ("model", "diffusion"))
    # autoguided by the run's own early snapshot, shipped beside them; both bf16 on disk, fp32 loaded
    assert shipped["sampling"] == {**default["sampling"], "guide": "mnist-cpu-guide.pt"}
    guide_file = runs.guide_path(None, shipped, runs.PRETRAINED)
    guide = torch.load(guide_file, map_location="cpu", weights_only=True)
    assert guide["step"] < state["step"] and config.checkpoint_config(guide)["model"] == shipped["model"]
    for weights in (state["ema"], guide["ema"]):
        assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert all(w.dtype == torch.float32 for w in runs.load_guide(guide_file, shipped, "cpu").state_dict().values())
    monkeypatch.chdir(tmp_path)  # no out/ckpt.pt here
    code, stdout, stderr = run_in_process("loadmodel.py", "--num-samples", "10", "--steps", "5", "--out", str(tmp_path))
    assert code == 0, stderr
    assert "sampling the shipped weights" in stdout and "autoguidance w = 1.2" in stdout
    archive = np.load(tmp_path / "samples.npz")  # conditional: one of each digit
    assert archive["arr_0"].shape == (10, 28, 28, 1) and archive["labels"].tolist() == list(range(10))
    assert (tmp_path / "trajectory.gif").stat().st_size > 0


def test_training_lowers_the_loss_on_real_digits(mnist_root, digits, tmp_path):
    cfg = smoke_config(mnist_root, steps=60, checkpoint_every=60)
    sched = Schedule.from_config(cfg["diffusion"])

    def fixed_batch_loss(model):  # the same x_0, t and eps before and after training
        draws = training.draw(cfg, torch.Generator().manual_seed(0), digits[:256].shape, slice(None))
        with torch.no_grad():
            return helper.diffusion_loss(model, digits[:256], draws.t, draws.eps, sched, "eps").item()

    torch.manual_seed(cfg["training"]["seed"])
    before = fixed_batch_loss(Model.from_config(cfg))  # the initial weights train() starts from
    ema, losses, _ = training.train(cfg, str(tmp_path), progress=False)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    model = Model.from_config(cfg)
    model.load_state_dict(state["model"])
    assert fixed_batch_loss(model) < 0.8 * before


def test_the_loss_is_algorithm_1_with_min_snr_weights_in_x0_units():
    """L_simple = mean ||eps - eps_theta(sqrt(a) x_0 + sqrt(1 - a) eps, t)||^2, written out here
    independently; with min-SNR-gamma under v-prediction each sample weighs min(SNR, gamma) / (SNR + 1)."""
    sched = Schedule(helper.cosine_betas(100))
    generator = torch.Generator().manual_seed(0)
    x_0 = torch.rand(6, 1, 4, 4, generator=generator) * 2 - 1
    eps = torch.randn(x_0.shape, generator=generator)
    t = torch.tensor([0, 10, 30, 50, 80, 99])
    network = lambda x_t, t: 0.5 * x_t + t.float().reshape(-1, 1, 1, 1) / 100  # any function of (x_t, t)
    a = sched.alpha_bars[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x_0 + (1 - a).sqrt() * eps
    expected = (eps - network(x_t, t)).pow(2).mean()
    torch.testing.assert_close(helper.diffusion_loss(network, x_0, t, eps, sched, "eps"), expected)
    v = a.sqrt() * eps - (1 - a).sqrt() * x_0
    snr = (sched.alpha_bars / (1 - sched.alpha_bars))[t]
    per_sample = (v - network(x_t, t)).pow(2).mean(dim=(1, 2, 3)).double()
    expected = (per_sample * snr.clamp(max=5.0) / (snr + 1)).mean()
    torch.testing.assert_close(helper.diffusion_loss(network, x_0, t, eps, sched, "v", 5.0), expected)


def previous_algorithm_1(network, x_0, y, sched, cfg, generator, part):
    """The training loss as commit b230bd5 drew and computed it (main.diffusion_loss there): every
    process drew t, eps and the label drops for the whole global batch, then kept its rows."""
    k, n = part
    rows, B = slice(k * len(x_0), (k + 1) * len(x_0)), n * len(x_0)
    t = torch.randint(0, sched.T, (B,), generator=generator)[rows]
    eps = torch.randn((B, *x_0.shape[1:]), generator=generator)[rows]
    drop = torch.rand(B, generator=generator)[rows] < cfg["training"]["p_uncond"]
    y = torch.where(drop, torch.full_like(y, cfg["model"]["num_classes"]), y)
    a = sched.alpha_bars.float()[t].reshape(-1, 1, 1, 1)
    output = network(a.sqrt() * x_0 + (1 - a).sqrt() * eps, t, y)
    per_sample = (output.float() - (a.sqrt() * eps - (1 - a).sqrt() * x_0)).pow(2).mean(dim=(1, 2, 3))
    snr = sched.snr()[t]
    return (per_sample * snr.clamp(max=cfg["training"]["min_snr_gamma"]) / (snr + 1)).mean()


@pytest.mark.parametrize("part", [(0, 1), (0, 2), (1, 2)])
def test_a_training_step_draws_and_computes_what_the_previous_commit_did(digits, part):
    """A fixed seed trains as before the loss was separated from the draws (the cpu preset's
    v-prediction, min-SNR and label dropout), alone and as either of two processes."""
    cfg = config.merge_config(config.get_config("cpu"), {"diffusion": {"T": 50}})
    sched = Schedule.from_config(cfg["diffusion"])
    torch.manual_seed(0)
    network = Model.from_config(cfg).eval()
    x_0, y = digits[:8], torch.arange(8)
    rows = slice(part[0] * 8, (part[0] + 1) * 8)
    with torch.no_grad():
        for seed in (0, 1):
            before, now = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            expected = previous_algorithm_1(network, x_0, y, sched, cfg, before, part)
            draws = training.draw(cfg, now, (8 * part[1], 1, 28, 28), rows, y)
            loss = training.algorithm_1(cfg)(network, x_0, draws)
            assert torch.equal(loss, expected) and torch.equal(now.get_state(), before.get_state())


def test_two_processes_draw_the_rows_of_what_one_process_draws():
    cfg = config.merge_config(config.get_config("smoke"), {"model": {"num_classes": 10},
                                                           "training": {"p_uncond": 0.5}})
    labels = torch.arange(16) % 10
    one = training.draw(cfg, torch.Generator().manual_seed(3), (16, 1, 28, 28), slice(None), labels)
    for k, rows in enumerate((slice(0, 8), slice(8, 16))):
        part = training.draw(cfg, torch.Generator().manual_seed(3), (16, 1, 28, 28), rows, labels[rows])
        for field in ("t", "eps", "labels"):
            assert torch.equal(getattr(part, field), getattr(one, field)[rows]), (k, field)


def assert_same_run(a_path, b_path):
    """Two checkpoints of one run: the same step, losses and weights, bit for bit."""
    a, b = (torch.load(path, weights_only=True) for path in (a_path, b_path))
    assert a["step"] == b["step"] and a["losses"] == b["losses"]
    for key in ("model", "ema", "extra_emas"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def test_resume_continues_the_same_run_exactly(mnist_root, tmp_path):
    def run_config(steps):  # conditional (null-label draws) with an extra EMA: every part of the state
        return config.merge_config(smoke_config(mnist_root, steps=steps, extra_ema_decays=[0.5]),
                                   {"model": {"num_classes": 10}})

    training.train(run_config(8), str(tmp_path / "straight"), progress=False)
    training.train(run_config(4), str(tmp_path / "halves"), progress=False)
    state = runs.load_checkpoint(str(tmp_path / "halves" / "ckpt.pt"), training=True)
    training.train(run_config(8), str(tmp_path / "halves"), state=state, progress=False)
    assert_same_run(tmp_path / "straight" / "ckpt.pt", tmp_path / "halves" / "ckpt.pt")


def test_set_changes_preset_values_and_is_refused_on_resume(tmp_path, mnist_root):
    cfg, _, _ = main.resolve(main.parse_args(["--preset", "smoke", "--set", "training.lr=0.003", "--data-root", mnist_root,
                                              "--set", "model.ch_mult=[1,2]", "--set", "diffusion.prediction=x0"]))
    assert cfg["training"]["lr"] == 0.003 and cfg["model"]["ch_mult"] == [1, 2]
    assert cfg["diffusion"]["prediction"] == "x0" and cfg == config.merge_config(config.get_config("smoke"), {
        "training": {"lr": 0.003}, "model": {"ch_mult": [1, 2]}, "diffusion": {"prediction": "x0"},
        "data": {"root": mnist_root}})
    with pytest.raises(config.UserError, match="--resume takes its preset, settings"):
        main.resolve(main.parse_args(["--resume", str(tmp_path / "ckpt.pt"), "--set", "training.lr=0.1"]))


def test_extra_emas_are_kept_and_evaluate_can_pick_one(mnist_root, tmp_path):
    """An extra EMA of the run's own decay is the EMA, one of decay 0 is the weights themselves."""
    training.train(smoke_config(mnist_root, steps=6, extra_ema_decays=[0.9, 0.0]), str(tmp_path), progress=False)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["config"]["training"]["ema_decay"] == 0.9
    for name, value in state["ema"].items():  # the first extra copy, decay 0.9, kept beside the EMA
        assert torch.equal(state["extra_emas"][f"0.{name}"], value), name
    for decay, expected in ((0.0, state["model"]), (None, state["ema"])):
        model, _ = runs.load_ema_model(str(tmp_path / "ckpt.pt"), "cpu", decay)
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), (decay, name)
    assert any(not torch.equal(state["ema"][name], state["model"][name]) for name in state["ema"])
    with pytest.raises(config.UserError, match="keeps the EMA of decay 0.9, 0.9, 0, not 0.5"):
        runs.load_ema_model(str(tmp_path / "ckpt.pt"), "cpu", 0.5)


def test_budgeted_steps_fill_the_minutes_left_at_the_measured_rate():
    assert training.budgeted_steps(30, 100.0, 0.5) == int((30 * 60 * (1 - training.BUDGET_RESERVE) - 100) / 0.5)
    assert training.budgeted_steps(1, 120.0, 0.5) == 1  # start-up alone spent the budget: one step


@pytest.mark.parametrize("flags, minutes, total", [
    ([], 30.0, None), (["--steps", "100"], 0.0, 100), (["--epochs", "2"], 0.0, 2 * (60000 // 128)),
    (["--minutes", "5"], 5.0, None),
])
def test_the_cpu_preset_runs_on_a_time_budget_unless_steps_or_epochs_are_given(flags, minutes, total, mnist_root):
    cfg, _, _ = main.resolve(main.parse_args(["--preset", "cpu", "--data-root", mnist_root, *flags]))
    assert cfg["training"]["minutes"] == minutes and training.total_steps_of(cfg) == total


def test_a_time_budget_fixes_the_step_count_and_resume_keeps_it(mnist_root, tmp_path, monkeypatch):
    measured = []

    def budgeted(minutes, seconds_so_far, seconds_per_step):  # the arithmetic is tested above
        measured.append((minutes, seconds_so_far, seconds_per_step))
        return 6
    monkeypatch.setattr(training, "budgeted_steps", budgeted)
    monkeypatch.setattr(training, "BUDGET_STEPS", 2)  # timing 2 steps runs the same code as timing 20
    budget_args = ["--preset", "smoke", "--minutes", "2", "--data-root", mnist_root, "--out"]
    main.main(budget_args + [str(tmp_path / "budget")])
    [(minutes, seconds_so_far, seconds_per_step)] = measured
    assert minutes == 2 and seconds_so_far > 0 and seconds_per_step > 0
    budget = torch.load(tmp_path / "budget" / "ckpt.pt", weights_only=True)
    assert budget["config"]["training"]["steps"] == budget["step"] == len(budget["losses"]) == 6

    def assert_same_weights(state):
        for key in ("model", "ema"):
            assert all(torch.equal(state[key][name], budget[key][name]) for name in budget[key])
        assert state["losses"] == budget["losses"] and state["lrs"] == budget["lrs"]
    # the timed steps leave nothing behind: the run is the one told its step count
    main.main(["--preset", "smoke", "--steps", "6", "--data-root", mnist_root, "--out", str(tmp_path / "fixed")])
    assert_same_weights(torch.load(tmp_path / "fixed" / "ckpt.pt", weights_only=True))

    # Ctrl-C at step 4, then the same command again: it resumes with the count it chose
    calls, update_ema = [], training.update_ema

    def interrupting_update_ema(*args):
        update_ema(*args)
        calls.append(1)
        if len(calls) == training.BUDGET_STEPS + 1 + 4:  # the timed steps, then 4 of the run
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(training, "update_ema", interrupting_update_ema)
    with pytest.raises(SystemExit) as stopped:
        main.main(budget_args + [str(tmp_path / "resumed")])
    assert stopped.value.code == 130
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 4
    main.main(budget_args + [str(tmp_path / "resumed")])
    assert len(measured) == 2  # no third timing: the count came from the checkpoint
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["step"] == 6


def test_nan_loss_stops_and_keeps_last_good_checkpoint(mnist_root, tmp_path, monkeypatch):
    real_loss, calls = helper.diffusion_loss, []

    def loss_that_explodes(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(helper, "diffusion_loss", loss_that_explodes)
    with pytest.raises(runs.RunError, match="loss is nan at step 5"):  # one line, exit code 1
        training.train(smoke_config(mnist_root, steps=8, checkpoint_every=4), str(tmp_path), progress=False)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == 4 and all(np.isfinite(state["losses"]))


def test_ctrl_c_checkpoints_and_resume_finishes(mnist_root, tmp_path):
    args = [sys.executable, "main.py", "--preset", "smoke", "--data-root", mnist_root, "--out", str(tmp_path),
            "--steps", "100000"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "ckpt.pt"
    deadline = time.time() + 90
    while not ckpt.exists() and time.time() < deadline:  # wait until training is under way
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted (SIGINT) at step" in stderr and "Traceback" not in stderr
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 100000
    code, _, stderr = run_in_process("main.py", "--resume", str(ckpt), "--steps", str(step + 2))
    assert code == 0, stderr
    assert torch.load(ckpt, weights_only=True)["step"] == step + 2


def test_loadmodel_writes_figures_and_npz(trained, tmp_path):
    code, _, stderr = run_script("loadmodel.py", str(trained / "ckpt.pt"), "--num-samples", "5", "--seed", "3",
                                 "--out", str(tmp_path))
    assert code == 0, stderr
    for name in ("trajectory.png", "trajectory.gif", "samples_grid.png"):
        assert (tmp_path / name).stat().st_size > 0
    samples = np.load(tmp_path / "samples.npz")["arr_0"]
    assert samples.shape == (5, 28, 28, 1) and samples.dtype == np.uint8


@pytest.mark.parametrize("sampler, eta", [("ddpm", "0"), ("ddim", "0"), ("dpm++", "0"), ("heun", "0"), ("ddim", "1"),
                                          ("dpm++", "1"), ("heun", "1")])
def test_loadmodel_runs_each_sampler_on_fewer_steps(trained, tmp_path, sampler, eta):
    loadmodel.main([str(trained / "ckpt.pt"), "--sampler", sampler, "--steps", "5", "--eta", eta,
                    "--num-samples", "2", "--out", str(tmp_path)])
    assert np.load(tmp_path / "samples.npz")["arr_0"].shape == (2, 28, 28, 1)


@pytest.mark.parametrize("flags, fragment", [(["--steps", "21"], "sampling.steps must be in [0, T=20]"),
                                             (["--eta", "-1"], "sampling.eta must not be negative"),
                                             (["--sampler", "heun", "--eta", "2"], "heun sampler's eta must be in [0, 1]")])
def test_loadmodel_refuses_bad_sampling_flags(trained, flags, fragment):
    code, _, stderr = run_in_process("loadmodel.py", str(trained / "ckpt.pt"), *flags)
    assert_one_line_error(code, stderr, fragment)


def test_loadmodel_seed_reproduces_samples(trained, tmp_path):
    for name in ("a", "b"):
        loadmodel.main([str(trained / "ckpt.pt"), "--num-samples", "3", "--seed", "7", "--out", str(tmp_path / name)])
    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"] for name in ("a", "b"))
    assert np.array_equal(a, b)


def test_loadmodel_compiled_sampling_matches_eager(trained, tmp_path):
    """--compile (frozen weights, inductor) changes the arithmetic's order, not the samples."""
    for flag in ("--no-compile", "--compile"):
        with no_eager_fallback() if flag == "--compile" else contextlib.nullcontext():
            loadmodel.main([str(trained / "ckpt.pt"), "--sampler", "ddim", "--steps", "5", "--num-samples", "4",
                            flag, "--out", str(tmp_path / flag)])
    eager, compiled = (np.load(tmp_path / flag / "samples.npz")["arr_0"].astype(int)
                       for flag in ("--no-compile", "--compile"))
    assert np.abs(eager - compiled).max() <= 1 and eager.std() > 0


def test_forwardprocess_writes_figures_and_reports_x_T(mnist_root, tmp_path):
    code, stdout, stderr = run_script("forwardprocess.py", "--data-root", mnist_root, "--out", str(tmp_path))
    assert code == 0, stderr
    assert (tmp_path / "forward_chain.png").stat().st_size > 0
    assert (tmp_path / "forward_closed_form.png").stat().st_size > 0
    assert "alpha_bar_T = 0.07492" in stdout  # the paper schedule keeps 27% of the digit in x_T


def assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("args, fragment", [
    (["main.py", "--preset", "nope"], "unknown preset 'nope'"),
    (["main.py", "--steps", "0"], "must be positive"),
    (["main.py", "--epochs", "-3"], "must be positive"),
    (["main.py", "--minutes", "0"], "must be positive"),
    (["main.py", "--minutes", "half"], "must be a number"),
    (["main.py", "--minutes", "5", "--steps", "10"], "not allowed with argument"),
    (["main.py", "--resume", "/nonexistent/ckpt.pt"], "does not exist"),
    (["main.py", "--set", "training.lr"], "--set wants SECTION.KEY=VALUE"),
    (["main.py", "--set", "training.nope=1"], "unknown config.training key 'nope'"),
    (["main.py", "--set", "training.lr=fast"], "config.training.lr must be float"),
    (["main.py", "--set", "diffusion.prediction=score"], "unknown diffusion.prediction 'score'"),
    (["loadmodel.py", "/nonexistent/ckpt.pt"], "does not exist"),
    (["loadmodel.py", "--num-samples", "0"], "must be positive"),
    (["loadmodel.py", "--sampler", "euler"], "invalid choice"),
    (["forwardprocess.py", "--preset", "nope"], "unknown preset"),
    (["main.py", "--device", "tpu"], "device 'tpu' is not available"),
])
def test_bad_arguments_get_one_line_and_exit_2(args, fragment, mnist_root):
    code, _, stderr = run_in_process(*args, "--data-root", mnist_root) if args[0] == "main.py" else run_in_process(*args)
    assert_one_line_error(code, stderr, fragment)


def test_missing_mnist_names_the_four_files(tmp_path):
    code, _, stderr = run_in_process("forwardprocess.py", "--data-root", str(tmp_path))
    assert_one_line_error(code, stderr, "MNIST not found", *data.MNIST_FILES)


def test_non_checkpoint_and_truncated_files_are_refused(trained, tmp_path):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((trained / "ckpt.pt").read_bytes()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    for path, fragment in [(text_file, "not a readable checkpoint"), (truncated, "not a readable checkpoint"),
                           (foreign, "not a checkpoint written by main.py")]:
        code, _, stderr = run_in_process("loadmodel.py", str(path))
        assert_one_line_error(code, stderr, fragment)


def test_checkpoint_with_incompatible_config_is_refused(trained, tmp_path):
    state = torch.load(trained / "ckpt.pt", weights_only=True)
    state["config"]["model"]["ch"] = 32  # weights are for ch = 16
    torch.save(state, tmp_path / "wrong_width.pt")
    state["config"]["model"]["heads"] = 4  # a key this code does not know
    torch.save(state, tmp_path / "unknown_key.pt")
    code, _, stderr = run_in_process("loadmodel.py", str(tmp_path / "wrong_width.pt"))
    assert_one_line_error(code, stderr, "do not match the model")
    code, _, stderr = run_in_process("main.py", "--resume", str(tmp_path / "unknown_key.pt"))
    assert_one_line_error(code, stderr, "unknown checkpoint config.model key 'heads'")


@pytest.mark.parametrize("section, key, value, fragment", [
    ("training", "loss", "huber", "trained with training.loss, an option retired after commit b230bd5"),
    ("diffusion", "prediction", "edm", "unknown diffusion.prediction 'edm'")])
def test_checkpoints_of_retired_options_load_at_their_one_value_and_are_refused_at_another(
        trained, tmp_path, section, key, value, fragment):
    state = torch.load(trained / "ema.pt", weights_only=True)
    state["config"]["training"].update(loss="mse", huber_delta=1.0, timesteps="uniform", channels_last=False)
    torch.save(state, tmp_path / "before.pt")  # as commit b230bd5 wrote them
    assert "loss" not in runs.load_checkpoint(str(tmp_path / "before.pt"))["config"]["training"]
    state["config"][section][key] = value
    torch.save(state, tmp_path / "retired.pt")
    code, _, stderr = run_in_process("loadmodel.py", str(tmp_path / "retired.pt"))
    assert_one_line_error(code, stderr, fragment)


def test_benchmark_reports_throughput_flops_and_profile(tmp_path, monkeypatch):
    path = tmp_path / "bench.json"
    # the ceiling's matrix multiply at n = 1024, the same code as the 4096 a benchmark times
    monkeypatch.setattr(benchmark, "matmul_ceiling", functools.partial(benchmark.matmul_ceiling, n=1024))
    code, stdout, stderr = run_in_process("benchmark.py", "--preset", "smoke", "--variants", "eager fp32",
                                          "--sample-batch", "8", "--profile", "--json", str(path))
    assert code == 0, stderr
    result = json.loads(path.read_text())
    (row,) = result["rows"]
    assert row["variant"] == "eager fp32" and row["train_img_s"] > 0 and row["sample_img_s"] > 0
    assert result["train_gflop_per_image"] > 2 * result["sample_gflop_per_image"] > 0  # backward costs ~2x forward
    assert 0 < row["train_mfu"] < 1 and result["ceiling_tflops"][result["ceiling_of"]] > 0
    assert "| ConvolutionBackward0 |" in stdout and "| eager fp32 |" in stdout


@pytest.mark.parametrize("native", [True, False])
def test_benchmark_runs_bf16_by_default_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(runs, "cpu_has_bf16", lambda: native)
    names = benchmark.default_variants("cpu")
    assert "eager fp32" in names and "fp32 + compile" in names
    assert ("bf16 autocast" in names) == native and len(names) == (len(benchmark.VARIANTS) if native else 3)
    assert "bf16 autocast" in benchmark.default_variants("cuda")


def test_benchmark_refuses_an_unknown_variant():
    code, _, stderr = run_script("benchmark.py", "--preset", "smoke", "--variants", "fp8")
    assert_one_line_error(code, stderr, "unknown variant")


def heading_anchors(path):
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    import re
    headings = re.findall(r"^#+ (.+)$", open(path).read(), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_relative_link_in_readme_and_docs_points_to_a_file_and_its_anchor():
    import glob
    import re
    pages = [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]
    for page in pages:
        for link in re.findall(r"\]\(([^)\s]+)\)", open(page).read()):
            if "://" in link:
                continue
            target, _, anchor = link.partition("#")
            path = os.path.join(os.path.dirname(page), target) if target else page
            assert os.path.exists(path), f"{page}: {link}"
            assert not anchor or anchor in heading_anchors(path), f"{page}: {link}"


def test_every_name_in_readmes_report_table_exists_in_the_code():
    import re
    table = open(os.path.join(REPO, "README.md")).read().split("## Reading the code beside the report")[1]
    names = re.findall(r"`(\w+)\.(\w+)`", table.split("\n## ")[0])
    assert len(names) > 30
    instances = {"Schedule": Schedule.from_config(config.get_config("smoke")["diffusion"]),
                 "Model": Model.from_config(config.get_config("smoke"))}
    for module, name in names:
        if name != "py":  # a file, `resnetblock.py`
            owner = instances.get(module) or importlib.import_module(module)
            assert hasattr(owner, name), f"{module}.{name}"
