"""Training on several processes with torchrun (gloo, on CPU): the same run as one process,
exact resume after a kill, SIGTERM, loading anywhere, and a batch that does not divide."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main
import processes
import runs
import training
from conftest import REPO
from test_faults import checkpoint_step
from test_scripts import assert_one_line_error, assert_same_run, run_in_process, smoke_config

STEPS = 24  # smoke steps (batch 16, checkpoints every 4)


def torchrun(processes, *args):
    """The argv of `torchrun --standalone --nproc_per_node N main.py ARGS` (a free port of its own)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "main.py", *args]


def train_args(mnist_root, out, steps=STEPS):
    return ["--preset", "smoke", "--data-root", mnist_root, "--out", str(out), "--steps", str(steps)]


def launch(argv):
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def worker_of_rank(launcher, rank):
    """The pid of torchrun's worker process of this rank."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher.pid})")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, mnist_root):
    """A smoke run of STEPS steps on two processes, uninterrupted."""
    out = tmp_path_factory.mktemp("two")
    proc = subprocess.run(torchrun(2, *train_args(mnist_root, out)), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out / "ckpt.pt"


def test_two_processes_train_as_one_at_the_same_global_batch(two_processes, mnist_root, tmp_path):
    training.train(smoke_config(mnist_root, steps=STEPS), str(tmp_path), progress=False)
    one, two = (torch.load(path, weights_only=True) for path in (tmp_path / "ckpt.pt", two_processes))
    assert two["processes"] == 2 and one["processes"] == 1
    # The same images, t, eps and label drops per step: each process's gradient is the mean over
    # its 8 rows and DDP averages the two, which equals the mean over all 16 up to fp32 rounding
    # (about 1e-7 relative). The losses agree to that; Adam turns such differences into steps
    # of up to lr where a gradient is near zero, so the weights are compared by their norm:
    # 3.5e-6 relative after 12 steps was measured, a wrong row or draw is above 1e-2.
    assert torch.allclose(torch.tensor(one["losses"]), torch.tensor(two["losses"]), rtol=1e-5, atol=0)
    for key in ("model", "ema"):
        difference = torch.cat([(one[key][name] - two[key][name]).flatten() for name in one[key]])
        size = torch.cat([one[key][name].flatten() for name in one[key]])
        assert difference.norm() / size.norm() < 1e-4, key


def test_kill_9_of_one_rank_then_sigterm_then_the_same_command_ends_as_the_uninterrupted_run(
        two_processes, mnist_root, tmp_path):
    command, ckpt = torchrun(2, *train_args(mnist_root, tmp_path)), tmp_path / "ckpt.pt"
    launcher = launch(command)
    checkpoint_step(ckpt)
    os.kill(worker_of_rank(launcher, 1), signal.SIGKILL)  # torchrun then stops rank 0 and fails the job
    launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    killed_at = checkpoint_step(ckpt)
    assert killed_at < STEPS, "the run finished before it could be killed"

    launcher = launch(command)  # the same command resumes; SIGTERM to torchrun stops every rank at one step
    while checkpoint_step(ckpt) <= killed_at and launcher.poll() is None:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    interrupted = [line for line in stderr.splitlines() if line.startswith("interrupted (SIGTERM) at step")]
    assert len(interrupted) == 1, stderr  # rank 0 alone speaks
    step = checkpoint_step(ckpt)
    assert f"at step {step};" in interrupted[0] and "the same torchrun command" in interrupted[0]

    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert_same_run(ckpt, two_processes)  # bit for bit
    assert not (tmp_path / ".lock").exists()


def test_a_two_process_checkpoint_samples_and_resumes_in_one_process(two_processes, tmp_path, capsys):
    code, stdout, stderr = run_in_process("loadmodel.py", str(two_processes), "--out", str(tmp_path))
    assert code == 0, stderr
    assert (tmp_path / "samples.npz").exists()
    main.main(["--resume", str(two_processes), "--out", str(tmp_path / "one"), "--steps", str(STEPS + 2)])
    assert "resuming a run of 2 processes on 1" in capsys.readouterr().out
    assert runs.load_checkpoint(str(tmp_path / "one" / "ckpt.pt"))["processes"] == 1


def test_a_batch_that_does_not_divide_over_the_processes_is_one_line_and_exit_2(mnist_root, tmp_path,
                                                                                   monkeypatch):
    error = "the batch of 16 does not divide over 3 processes"
    proc = subprocess.run(torchrun(3, *train_args(mnist_root, tmp_path)), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert sum(error in line for line in proc.stderr.splitlines()) == 1, proc.stderr  # rank 0's line
    assert "exitcode: 2" in proc.stderr.replace("  ", " ").replace(" :", ":")  # torchrun's report of every rank
    assert not (tmp_path / "ckpt.pt").exists()
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("WORLD_SIZE", "3")  # a worker as torchrun starts it
    assert_one_line_error(*run_in_process("main.py", *train_args(mnist_root, tmp_path))[::2], error)


def test_more_processes_than_gpus_is_one_line_on_every_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(runs.UserError, match="torchrun started 2 processes on a machine with 1 CUDA device"):
        with processes.Processes("cuda", environ):
            pass
