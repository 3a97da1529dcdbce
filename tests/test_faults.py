"""Faults a run must survive on the smoke preset: kill -9 at any moment (also between writing
a checkpoint and renaming it), SIGTERM, a second command into the same folder, a failing disk,
sampling far more digits than one batch, and damaged inputs of every kind."""
import errno
import glob
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
import main
import runs
import training
from conftest import REPO
from config import UserError
from test_scripts import assert_one_line_error, assert_same_run, run_in_process, run_script, smoke_config

STEPS = 40  # smoke steps of the interrupted runs; checkpoints every 4


def train_args(mnist_root, out, steps=STEPS, *extra):
    return ["main.py", "--preset", "smoke", "--data-root", mnist_root, "--out", str(out), "--steps", str(steps), *extra]


def start(args):
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def run_with_patch(patch, args, timeout=120):
    """Run a script in a subprocess after executing `patch` (Python source) in it."""
    source = f"import sys; sys.argv = {args!r}\n{patch}\nimport runs, {args[0][:-3]} as script\nruns.run(script.main)"
    proc = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def checkpoint_step(path, timeout=90):
    """Wait until `path` exists; its step (loading it must always work)."""
    deadline = time.time() + timeout
    while not os.path.exists(path):
        assert time.time() < deadline, f"no checkpoint appeared at {path}"
        time.sleep(0.05)
    return runs.load_checkpoint(str(path))["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mnist_root):
    """The uninterrupted run the interrupted ones must end up equal to."""
    out = tmp_path_factory.mktemp("reference")
    training.train(smoke_config(mnist_root, steps=STEPS), str(out), progress=False)
    return out / "ckpt.pt"


def test_kill_9_at_random_moments_then_resume_ends_as_the_uninterrupted_run(mnist_root, tmp_path, reference):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt.pt"
    rng = random.Random(0)
    proc = start(train_args(mnist_root, out))
    time.sleep(rng.uniform(0.2, 1.0))  # during start-up, before any checkpoint
    proc.kill()
    proc.wait()
    kills = 0
    while kills < 2:
        args = train_args(mnist_root, out, STEPS, *(["--resume", str(ckpt)] if ckpt.exists() else []))
        if ckpt.exists():
            args.remove("--preset"), args.remove("smoke")  # --resume takes them from the checkpoint
        proc = start(args)
        seen = checkpoint_step(ckpt) if ckpt.exists() else -1
        while checkpoint_step(ckpt) <= seen and proc.poll() is None:  # wait until it has made progress
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        assert (out / ".lock").exists()  # left behind by the killed run: stale from now on
        step = checkpoint_step(ckpt)  # loadable after every kill
        assert 0 < step < STEPS, "the run finished before it could be killed"
        kills += 1
    code, _, stderr = run_script(*train_args(mnist_root, out))  # the same command resumes it
    assert code == 0, stderr
    assert_same_run(ckpt, reference)
    assert not (out / ".lock").exists()


def test_kill_between_writing_and_renaming_a_checkpoint_keeps_the_previous_one(mnist_root, tmp_path, reference):
    patch = ("import os, signal\nreal, calls = os.replace, []\n"
             "def dying_replace(src, dst):\n"
             "    calls.append(src)\n"
             "    if len(calls) == 3: os.kill(os.getpid(), signal.SIGKILL)\n"
             "    real(src, dst)\n"
             "os.replace = dying_replace")
    code, _, _ = run_with_patch(patch, train_args(mnist_root, tmp_path))
    assert code == -signal.SIGKILL
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 8  # the third write (step 12) died
    assert len(glob.glob(str(tmp_path / "ckpt.pt.*.tmp"))) == 1  # the half-done write, never renamed
    code, _, stderr = run_in_process(*train_args(mnist_root, tmp_path))
    assert code == 0, stderr
    assert_same_run(tmp_path / "ckpt.pt", reference)
    assert not glob.glob(str(tmp_path / "*.tmp"))


def test_sigterm_checkpoints_like_ctrl_c_and_the_lock_refuses_a_second_run(mnist_root, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    proc = start(train_args(mnist_root, tmp_path, 100000))
    checkpoint_step(ckpt)
    code, _, stderr = run_in_process(*train_args(mnist_root, tmp_path, 100000))  # the same run, while it runs
    assert_one_line_error(code, stderr, f"another run (pid {proc.pid}) is writing")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted (SIGTERM) at step" in stderr and "Traceback" not in stderr
    step = checkpoint_step(ckpt)
    main.main(["--resume", str(ckpt), "--steps", str(step + 2)])
    assert runs.load_checkpoint(str(ckpt))["step"] == step + 2


def test_another_run_into_a_used_folder_is_refused_and_a_finished_one_is_never_redone(mnist_root, tmp_path, capsys):
    args = train_args(mnist_root, tmp_path, 8)[1:]
    main.main(args)
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(UserError, match="holds another run; continue it with --resume .* --out DIR.* --overwrite"):
        main.main(args + ["--seed", "1"])
    main.main(args)
    assert "is complete at step 8 of 8" in capsys.readouterr().out
    main.main(["--resume", str(tmp_path / "ckpt.pt"), "--steps", "4"])
    assert (tmp_path / "ckpt.pt").read_bytes() == before  # neither replaced nor shortened
    main.main(train_args(mnist_root, tmp_path, 4, "--overwrite")[1:])
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4  # only on request


def test_a_failing_checkpoint_write_keeps_the_previous_file_and_says_so_in_one_line(mnist_root, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def full_disk(obj, f):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f)
    monkeypatch.setattr(torch, "save", full_disk)
    code, _, stderr = run_in_process(*train_args(mnist_root, tmp_path, 12))
    assert code == 1, stderr
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr and f"could not write {tmp_path / 'ckpt.pt'}: No space left on device" in lines[-1]
    assert runs.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4
    assert not glob.glob(str(tmp_path / "*.tmp")) and not (tmp_path / ".lock").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_freed_memory_stops_the_page_faults_of_large_tensors():
    """A fresh 100 MB tensor at every step: glibc maps and faults it in each time, unless told
    to keep freed memory, when most steps reuse it (the heap settles after a few steps)."""
    source = ("import resource, sys, torch, runs\n"
              "torch.set_num_threads(1)\n"
              "if sys.argv[1] == 'keep': runs.keep_freed_memory()\n"
              "x, faults = torch.ones(25_000_000), []\n"
              "for _ in range(40):\n"
              "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "    y = x * 2\n"
              "    del y\n"
              "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
              "print(*faults)")
    faults = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", source, mode], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        faults[mode] = [int(n) for n in proc.stdout.split()]
    assert min(faults["default"]) > 0  # 100 MB is 24,400 pages of 4 KB (fewer with huge pages)
    assert sum(faults["keep"]) < sum(faults["default"]) / 2, faults


def peak_rss_mb(checkpoint, out, num_samples):
    source = ("import resource, runs, loadmodel\n"  # runs.run: as `python loadmodel.py` runs, freed memory kept
              f"runs.run(lambda: loadmodel.main([{str(checkpoint)!r}, '--num-samples', '{num_samples}', "
              f"'--batch-size', '50', '--steps', '1', '--out', {str(out)!r}]))\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    proc = subprocess.run([sys.executable, "-c", source], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip().splitlines()[-1])


def test_loadmodel_memory_does_not_grow_with_the_number_of_samples(trained, tmp_path):
    """One sampler step per batch: what a batch holds does not depend on the number of steps."""
    small, large = (peak_rss_mb(trained / "ckpt.pt", tmp_path / str(n), n) for n in (50, 2000))
    # in one batch, 2000 samples' activations would take 100 MB each; in batches of 50 only the
    # digits grow, 1.5 MB as uint8
    assert large - small < 30, (small, large)
    assert len(np.load(tmp_path / "2000" / "samples.npz")["arr_0"]) == 2000


@pytest.fixture(scope="module")
def checkpoint_bytes(trained):
    return (trained / "ckpt.pt").read_bytes()


def damaged_configs():
    """(section, key, value) changes that no config may carry."""
    return [("model", "ch", "16"), ("model", "ch", -4), ("model", "ch", 17), ("model", "ch_mult", "12"),
            ("model", "ch_mult", ["a"]), ("model", "ch_mult", [1.5]), ("model", "ch_mult", []),
            ("model", "attn_resolutions", 14), ("model", "attn_resolutions", [None]), ("model", "dropout", 2.0),
            ("model", "norm_group_channels", 0), ("model", "norm_group_channels", 3),
            ("model", "num_classes", 10), ("model", "ch", 32), ("model", "heads", 4), ("diffusion", "T", 0),
            ("diffusion", "prediction", "score"), ("diffusion", "schedule", None), ("sampling", "steps", 10 ** 6),
            ("training", "bf16", True), ("data", "image_size", 30), ("sampling", "guidance", -1.0)]


def test_fuzzed_checkpoints_are_refused_as_user_errors(checkpoint_bytes, tmp_path):
    rng = np.random.default_rng(0)
    cases = {f"random{i}": rng.integers(0, 256, n, dtype=np.uint8).tobytes() for i, n in enumerate([0, 10, 5000])}
    for length in (1, 100, 1000, len(checkpoint_bytes) // 2, len(checkpoint_bytes) - 1):
        cases[f"truncated{length}"] = checkpoint_bytes[:length]
    for name, data in cases.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    state = torch.load(__import__("io").BytesIO(checkpoint_bytes), weights_only=True)
    for i, (section, key, value) in enumerate(damaged_configs()):
        damaged = {**state, "config": {**state["config"], section: {**state["config"][section], key: value}}}
        torch.save(damaged, tmp_path / f"config{i}.pt")
    for i, (key, value) in enumerate([("ema", torch.zeros(3)), ("ema", {"conv_in.weight": torch.zeros(1)}),
                                      ("config", 5), ("step", "8"), ("config", {"model": 5})]):
        torch.save({**state, key: value}, tmp_path / f"state{i}.pt")
    for path in sorted(tmp_path.glob("*.pt")):
        with pytest.raises(UserError):
            runs.load_ema_model(str(path), "cpu")
    for path in sorted(tmp_path.glob("[rt]*.pt")):  # unreadable files, for the resume path too
        with pytest.raises(UserError):
            main.resolve(main.parse_args(["--resume", str(path)]))


@pytest.mark.parametrize("arrays, fragment", [
    ({"arr_0": np.random.default_rng(0).random((8, 28, 28, 1))}, "must be uint8"),
    ({"arr_0": np.full((8, 28, 28, 1), 1000, np.int16)}, "must be uint8"),
    ({"arr_0": np.zeros((8, 28, 28, 1), np.uint8), "labels": np.full(8, 10)}, "labels must be classes 0-9"),
    ({"arr_0": np.zeros((8, 28, 28, 1), np.uint8), "labels": np.zeros(8)}, "labels must be integers"),
    ({"arr_0": np.zeros((8, 28, 28, 1), np.uint8), "labels": np.zeros(7, np.int64)}, "labels must be integers"),
])
def test_npz_with_wrong_range_or_labels_is_refused(tmp_path, arrays, fragment, mnist_root):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=fragment):
        evaluate.read_npz(str(tmp_path / "bad.npz"), "mnist", mnist_root)


def test_damaged_inputs_give_one_line_on_the_command_line(checkpoint_bytes, tmp_path):
    (tmp_path / "truncated.pt").write_bytes(checkpoint_bytes[:len(checkpoint_bytes) // 3])
    (tmp_path / "random.npz").write_bytes(os.urandom(3000))
    for args, fragment in [(["loadmodel.py", str(tmp_path / "truncated.pt")], "not a readable checkpoint"),
                           (["evaluate.py", str(tmp_path / "random.npz")], "not a readable .npz"),
                           (["main.py", "--resume", str(tmp_path / "truncated.pt")], "not a readable checkpoint")]:
        code, _, stderr = run_in_process(*args)
        assert_one_line_error(code, stderr, fragment)
