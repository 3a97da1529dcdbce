"""distill.py: the guided target, the two-step DDIM target against its closed form, the w
embedding, a smoke chain of stages loading in the other scripts, exact resume, bad input; the
consistency stage's target and gap schedule, its smoke stage and resume; the adversarial stage's
R1 penalty and losses, its smoke stage and resume."""
import math
import os
import signal

import numpy as np
import pytest
import torch

import config
import distill
import distill_losses
import guidance
import helper
import runs
import samplers
import training
from helper import Schedule
from model import Model
from test_control import conditional_model, inputs
from test_scripts import assert_one_line_error, assert_same_run, run_in_process


def student_of(teacher, cfg, seed=2):
    """A student with the w input, copied from `teacher` as distill.py copies it; its w embedding
    made non-zero when seed is given, so that w matters."""
    cfg = config.merge_config(cfg, {"model": {"guidance_embedding": True}})
    student = Model.from_config(cfg).eval()
    runs.load_weights(student, teacher.state_dict(), new_layers_allowed=True)
    if seed is not None:
        torch.manual_seed(seed)
        with torch.no_grad():
            student.guidance_emb[-1].weight.normal_(std=0.1)
    return student, cfg


def test_a_new_student_is_its_teacher_for_every_w_and_the_w_embedding_then_matters():
    teacher, cfg = conditional_model()
    student, _ = student_of(teacher, cfg, seed=None)
    x, t = inputs()
    y = torch.tensor([3, 7, 1, 10])  # the last: the null label
    with torch.no_grad():
        reference = teacher(x, t, y)
        for w in (0.0, 1.1, 2.0):
            torch.testing.assert_close(student(x, t, y, torch.full((4,), w)), reference, rtol=0, atol=0)
        trained, _ = student_of(teacher, cfg)
        low, high = (trained(x, t, y, torch.full((4,), w)) for w in (0.5, 1.5))
    assert (low - high).abs().max() > 1e-3
    with pytest.raises(AssertionError, match="guidance weight"):
        teacher(x, t, y, torch.ones(4))
    with pytest.raises(AssertionError, match="guidance weight"):
        student(x, t, y)


def test_a_guidance_distilled_student_samples_in_one_call_of_batch_B_with_w_as_input():
    teacher, cfg = conditional_model()
    student, cfg = student_of(teacher, cfg)
    calls = []

    def recording(x, t, y, w):
        calls.append((x.shape[0], y.tolist(), [round(v, 4) for v in w.tolist()]))
        return student(x, t, y, w)

    x, t = inputs()
    labels = torch.tensor([3, 7, 1, 9])
    with torch.no_grad():
        guided = guidance.Guided(recording, labels, 1.7, 10, takes_w=True)(x, t)
        torch.testing.assert_close(guided, student(x, t, labels, torch.full((4,), 1.7)))
        guidance.Guided(recording, labels, 0.0, 10, takes_w=True)(x, t)  # w = 0: the null label
    assert calls == [(4, [3, 7, 1, 9], [1.7] * 4), (4, [10] * 4, [0.0] * 4)]


def test_the_guided_target_is_uncond_plus_w_times_cond_minus_uncond():
    teacher, cfg = conditional_model()
    student, cfg = student_of(teacher, cfg)
    cfg = config.merge_config(cfg, {"training": {"p_uncond": 0.3}})
    x_0 = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.arange(16) % 10
    seen = {}

    def exact(x_in, t, labels, w):  # a student that outputs the guided teacher exactly
        seen["w"], seen["labels"] = w, labels
        conditional, unconditional = teacher(x_in, t, labels), teacher(x_in, t, torch.full_like(labels, 10))
        return unconditional + w.view(-1, 1, 1, 1) * (conditional - unconditional)

    def conditional_only(x_in, t, labels, w):
        return teacher(x_in, t, labels)

    draws = training.draw(cfg, torch.Generator().manual_seed(0), x_0.shape, slice(None), y)
    loss_of = distill_losses.stage_loss(config.merge_config(cfg, {"distill": {"stage": "guidance"}}), teacher)
    with torch.no_grad():
        loss, wrong = loss_of(exact, x_0, draws), loss_of(conditional_only, x_0, draws)
    assert loss.item() < 1e-10 and wrong.item() > 1e-4
    low, high = cfg["distill"]["guidance_range"]
    assert low <= seen["w"].min() and seen["w"].max() <= high and seen["w"].std() > 0.1
    assert (seen["labels"] == 10).any() and (seen["labels"] < 10).any()  # some labels dropped to null


def test_the_autoguided_target_is_guide_plus_w_times_teacher_minus_guide_at_the_labels():
    teacher, cfg = conditional_model()
    guide, _ = conditional_model(seed=5)  # a weaker network, conditioned alike
    _, cfg = student_of(teacher, cfg)
    cfg = config.merge_config(cfg, {"training": {"p_uncond": 0.3}})
    x_0 = torch.rand(16, 1, 28, 28) * 2 - 1
    y = torch.arange(16) % 10

    def exact(x_in, t, labels, w):  # a student that outputs the autoguided teacher exactly
        return guidance.guided_output(teacher(x_in, t, labels), guide(x_in, t, labels), w.view(-1, 1, 1, 1))

    def classifier_free(x_in, t, labels, w):
        return guidance.guided_output(teacher(x_in, t, labels), teacher(x_in, t, torch.full_like(labels, 10)),
                                      w.view(-1, 1, 1, 1))

    draws = training.draw(cfg, torch.Generator().manual_seed(0), x_0.shape, slice(None), y)
    loss_of = distill_losses.stage_loss(config.merge_config(cfg, {"distill": {"stage": "guidance"}}), teacher, guide)
    with torch.no_grad():
        loss, wrong = loss_of(exact, x_0, draws), loss_of(classifier_free, x_0, draws)
    assert loss.item() < 1e-10 and wrong.item() > 1e-4


def test_one_ddim_step_to_the_two_step_target_lands_where_two_steps_landed():
    generator = torch.Generator().manual_seed(0)
    x_t, x_next = torch.randn(2, 8, 1, 4, 4, generator=generator)
    for alpha_bar_t, alpha_bar_next in [(0.1, 0.5), (0.6, 0.9), (0.3, 1.0)]:  # 1.0: the last step, to x_0
        x_0 = distill_losses.two_step_target(x_t, x_next, torch.tensor(alpha_bar_t), torch.tensor(alpha_bar_next))
        eps = (x_t - alpha_bar_t ** 0.5 * x_0) / (1 - alpha_bar_t) ** 0.5  # what x_0 implies at x_t
        torch.testing.assert_close(samplers.ddim_step(x_0, eps, alpha_bar_next), x_next, rtol=1e-5, atol=1e-5)


def test_ddim_step_is_the_ddim_samplers_step():
    model, cfg = conditional_model()
    sched = Schedule(helper.cosine_betas(20)).respace([9, 19])
    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    network = guidance.Guided(model, torch.tensor([1, 2, 3, 4]), 1.0, 10)
    with torch.no_grad():
        sampled = samplers.ddim_sample(network, x_T, sched, prediction="v", progress=False)
        x = x_T
        for i in (1, 0):
            x_0, eps, _ = samplers.denoise(network, x, i, sched, "v", False)
            x = samplers.ddim_step(x_0, eps, sched.alpha_bars_prev[i].item())
    torch.testing.assert_close(x, sampled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_student_that_outputs_its_target_samples_as_its_teacher_at_twice_the_steps(steps):
    """Salimans & Ho's construction, exactly: if the student outputs progressive_target at every
    x_t it meets, its N DDIM steps reproduce the teacher's 2N (clipped or not)."""
    teacher, cfg = conditional_model()
    diffusion = config.merge_config(cfg, {"diffusion": {"T": 64, "schedule": "cosine", "prediction": "v"}})["diffusion"]
    student_sched, teacher_sched = distill_losses.student_and_teacher_schedules(tuple(diffusion.items()), steps)
    labels = torch.tensor([3, 7, 1, 9])

    def teacher_net(x, t):
        return teacher(x, t, labels)

    def oracle(x, t):  # the student's timestep t -> its level k
        k = torch.searchsorted(student_sched.timesteps.to(t.device), t)
        return distill_losses.progressive_target(teacher_net, x, k, student_sched, teacher_sched, "v", True)

    x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        two_n = samplers.ddim_sample(teacher_net, x_T, teacher_sched, prediction="v", clip_x0=True, progress=False)
        n = samplers.ddim_sample(oracle, x_T, student_sched, prediction="v", clip_x0=False, progress=False)
    assert student_sched.T == steps and teacher_sched.T == 2 * steps
    assert set(student_sched.timesteps.tolist()) <= set(teacher_sched.timesteps.tolist())
    torch.testing.assert_close(n, two_n, rtol=1e-4, atol=1e-4)


def smoke_chain(teacher, out, mnist_root, to=2):
    """distill.py on a smoke teacher: guidance, then 8 -> 4 (-> 2) DDIM steps, 6 optimiser steps a stage."""
    return ["distill.py", str(teacher), "--out", str(out), "--start", "8", "--to", str(to), "--data-root", mnist_root,
            "--set", "training.minutes=0", "--set", "training.steps=6"]


@pytest.fixture(scope="module")
def chain(conditional_run, mnist_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    code, stdout, stderr = run_in_process(*smoke_chain(conditional_run / "ckpt.pt", out, mnist_root))
    assert code == 0, stderr
    return out


def test_a_smoke_chain_halves_the_steps_and_its_students_load_everywhere(chain, classifier_file, mnist_root,
                                                                           tmp_path):
    guided, two = (runs.load_checkpoint(str(chain / name / "ema.pt")) for name in ("guidance", "steps-2"))
    assert guided["config"]["distill"]["stage"] == "guidance" and guided["config"]["model"]["guidance_embedding"]
    s = two["config"]["sampling"]
    assert two["config"]["distill"] == {**two["config"]["distill"], "stage": "progressive", "steps": 2}
    assert (s["sampler"], s["steps"], s["eta"], s["guidance"], s["guidance_interval"]) == ("ddim", 2, 0.5, 1.2, [])
    assert two["step"] == 6
    four = runs.load_checkpoint(str(chain / "steps-4" / "ema.pt"))["config"]
    assert four["distill"]["steps"] == 4
    assert {key: four["sampling"][key] for key in ("eta", "guidance", "guidance_interval")} == {
        "eta": 0.6, "guidance": 1.6, "guidance_interval": [0.5, 3.0]}  # guided at its middle levels only
    assert "ddim, 2 steps" in samples_everywhere(chain / "steps-2" / "ema.pt", classifier_file, mnist_root, tmp_path)


def samples_everywhere(weights, classifier_file, mnist_root, out, *evaluate_args, steps=2):
    """A student of `steps` steps draws in loadmodel.py (in its own steps), edit.py and evaluate.py;
    returns evaluate.py's table."""
    code, _, stderr = run_in_process("loadmodel.py", str(weights), "--out", str(out))
    assert code == 0, stderr
    assert "ddim" in stderr and f"| 0/{steps} [" in stderr  # its own steps (the bar opens at 0; a fast last step may not redraw)
    assert np.load(out / "samples.npz")["arr_0"].shape[1:] == (28, 28, 1)
    code, _, stderr = run_in_process("edit.py", "interpolate", str(weights), "--out", str(out))
    assert code == 0, stderr
    code, _, stderr = run_in_process("evaluate.py", str(weights), "--num-samples", "40", "--no-compile", "--data-root",
                                     mnist_root, "--out", str(out), "--classifier", str(classifier_file[0]),
                                     *evaluate_args)
    assert code == 0, stderr
    return (out / "eval.md").read_text()


def test_an_interrupted_chain_resumes_exactly(chain, conditional_run, mnist_root, tmp_path, monkeypatch):
    real, calls = distill_losses.progressive_loss, []

    def interrupted(*args):  # Ctrl-C during the 4th step of the first round
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill_losses, "progressive_loss", interrupted)
    code, _, stderr = run_in_process(*smoke_chain(conditional_run / "ckpt.pt", tmp_path, mnist_root, to=4))
    assert code == 128 + signal.SIGINT, stderr
    assert runs.load_checkpoint(str(tmp_path / "steps-4" / "ckpt.pt"))["step"] == 4
    assert not (tmp_path / "steps-4" / "ema.pt").exists()
    monkeypatch.setattr(distill_losses, "progressive_loss", real)
    code, stdout, stderr = run_in_process(*smoke_chain(conditional_run / "ckpt.pt", tmp_path, mnist_root, to=4))
    assert code == 0, stderr
    assert "guidance is finished; skipping it" in stdout
    for stage in ("guidance", "steps-4"):  # the same as in the uninterrupted chain, bit for bit
        assert_same_run(tmp_path / stage / "ckpt.pt", chain / stage / "ckpt.pt")


def test_a_teacher_with_a_guide_is_distilled_autoguided_and_its_student_says_so(conditional_run, mnist_root,
                                                                                 tmp_path):
    code, stdout, stderr = run_in_process(*smoke_chain(conditional_run / "ckpt.pt", tmp_path, mnist_root, to=4),
                                          "--guide", str(conditional_run / "guide-0.5.pt"))
    assert code == 0, stderr
    assert "guidance distillation of autoguidance by" in stdout
    guided = runs.load_checkpoint(str(tmp_path / "guidance" / "ema.pt"))["config"]
    assert guided["distill"]["guide"] == "guide-0.5.pt" and guided["sampling"]["guide"] == ""
    four = runs.load_checkpoint(str(tmp_path / "steps-4" / "ema.pt"))["config"]
    assert four["distill"]["guide"] == "guide-0.5.pt"  # its teacher's, inherited
    code, stdout, stderr = run_in_process("loadmodel.py", str(tmp_path / "steps-4" / "ema.pt"), "--out",
                                          str(tmp_path / "drawn"))
    assert code == 0, stderr
    assert "autoguidance w = 1.6" in stdout
    code, _, stderr = run_in_process("distill.py", str(tmp_path / "guidance" / "ema.pt"), "--out",
                                     str(tmp_path / "again"), "--guide", str(conditional_run / "guide-0.5.pt"))
    assert_one_line_error(code, stderr, "--guide is for the guidance stage")


def test_the_last_round_gets_two_shares_of_the_budget_and_every_other_stage_one():
    assert distill.stage_minutes(60, 4) == [12, 12, 12, 24]  # guidance, 32 -> 16 -> 8 -> 4
    assert distill.stage_minutes(30, 2) == [10, 20]  # 4 -> 2 -> 1
    assert distill.stage_minutes(5, 1) == [5]


@pytest.mark.parametrize("args, fragment", [
    (["--start", "12"], "must be powers of two"),
    (["--to", "3"], "must be powers of two"),
    (["--start", "4", "--to", "4"], "nothing to distil to 4"),
])
def test_bad_step_counts_are_one_line(conditional_run, mnist_root, tmp_path, args, fragment):
    assert_one_line_error(*run_in_process("distill.py", str(conditional_run / "ckpt.pt"), "--out", str(tmp_path),
                                          *args)[::2], fragment)


def test_teachers_of_the_wrong_kind_are_one_line(trained, chain, tmp_path):
    code, _, stderr = run_in_process("distill.py", str(trained / "ckpt.pt"), "--out", str(tmp_path))
    assert_one_line_error(code, stderr, "guidance distillation needs a conditional teacher")
    code, _, stderr = run_in_process("distill.py", str(chain / "steps-2" / "ema.pt"), "--to", "2", "--out",
                                     str(tmp_path))
    assert_one_line_error(code, stderr, "the teacher samples in 2 steps: nothing to distil to 2")


# ----------------------------------------------------------------------------------------
# Consistency distillation.

def exact_network(x_0, sched):
    """The v-prediction network of data that is x_0 alone (B, C, S, S), as model(x, t, *inputs) on
    sched's levels: every point of its ODE trajectories maps to x_0."""
    def network(x_t, t, *inputs):
        eps = (x_t - helper.extract(sched.alpha_bars.sqrt(), t, x_t.shape) * x_0) / \
            helper.extract((1 - sched.alpha_bars).sqrt(), t, x_t.shape)
        return helper.training_target(x_0, eps, t, sched, "v")
    return network


def test_the_consistency_target_is_one_exact_ddim_step_and_f_is_x_at_the_clean_level():
    sched = Schedule(helper.cosine_betas(64))
    generator = torch.Generator().manual_seed(0)
    x_0, eps = torch.rand(2, 6, 1, 28, 28, generator=generator) * 2 - 1
    teacher = exact_network(x_0, sched)
    level_t, level_r = torch.tensor([63, 40, 20, 5, 1, 30]), torch.tensor([62, 10, -1, 4, 0, -1])
    x_t = helper.q_sample(x_0, level_t, eps, sched)
    x_r = distill_losses.teacher_step(teacher, x_t, level_t, level_r, sched, "v")
    a_r = torch.tensor([sched.alpha_bars[r].item() if r >= 0 else 1.0 for r in level_r]).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_r, a_r.sqrt() * x_0 + (1 - a_r).sqrt() * eps, rtol=1e-4, atol=1e-4)  # same eps
    torch.testing.assert_close(distill_losses.consistency_function(teacher, x_r, level_r, sched, "v"), x_0,
                               rtol=1e-4, atol=1e-4)
    clean = level_r < 0
    assert torch.equal(distill_losses.consistency_function(teacher, x_t, torch.full((6,), -1), sched, "v"), x_t)
    assert torch.equal(x_r[clean], distill_losses.consistency_function(teacher, x_t, level_t, sched, "v")[clean])


def test_the_consistency_loss_is_zero_for_a_consistent_student_and_positive_otherwise():
    _, cfg = conditional_model()
    cfg = config.merge_config(cfg, {"model": {"guidance_embedding": True},
                                    "diffusion": {"T": 64, "schedule": "cosine", "prediction": "v"}})
    sched = Schedule.from_config(cfg["diffusion"])
    x_0 = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss_of = distill_losses.stage_loss(config.merge_config(cfg, {"distill": {"stage": "consistency", "steps": 2}}),
                                 exact_network(x_0, sched))
    for progress in (0.0, 0.5, 0.99):
        draws = training.draw(cfg, torch.Generator().manual_seed(0), x_0.shape, slice(None), torch.arange(16) % 10,
                              progress)
        assert loss_of(exact_network(x_0, sched), x_0, draws).item() < 1e-5
        assert loss_of(exact_network(x_0.flip(0), sched), x_0, draws).item() > 1.0


def test_the_gap_starts_at_the_clean_image_halves_with_each_stage_and_stays_below_t():
    sigmas = Schedule(helper.cosine_betas(1000)).edm_sigmas()
    level_t, gaps = torch.arange(1000), []
    for stage in range(distill_losses.ECT["stages"]):
        level_r = distill_losses.gap_levels(level_t, sigmas, (stage + 0.5) / distill_losses.ECT["stages"])
        assert (level_r < level_t).all() and (level_r >= -1).all()
        gaps.append((1 - torch.where(level_r < 0, 0.0, sigmas[level_r.clamp(min=0)]) / sigmas).mean().item())
        for t, r in zip(level_t.tolist(), level_r.tolist()):
            sigma_t = sigmas[t].item()
            sigma_r = max(0.0, sigma_t * (1 - 2 ** -(stage + 1) * (1 + 8 * math.exp(-sigma_t) / (1 + math.exp(-sigma_t)))))
            if r == t - 1:  # at least one level down
                assert r == -1 or sigmas[r].item() <= sigma_r or sigmas[t - 1].item() > sigma_r
            else:  # the level at or below sigma_r
                assert (r == -1 or sigmas[r].item() <= sigma_r) and sigmas[r + 1].item() > sigma_r
        if stage == 0:  # below sigma = ln 7 every level's pair is the clean image
            assert (level_r[sigmas < math.log(7) - 1e-3] == -1).all()
    assert all(later < earlier for earlier, later in zip(gaps, gaps[1:])) and gaps[-1] < gaps[0] / 4, gaps


def one_stage(flag, teacher, out, mnist_root, *more):
    """distill.py's stage `flag` (--consistency, --adversarial) from `teacher`, 6 optimiser steps."""
    return ["distill.py", str(teacher), flag, "--out", str(out), "--data-root", mnist_root,
            "--set", "training.minutes=0", "--set", "training.steps=6", *more]


def one_stage_run(flag, teacher, mnist_root, tmp_path_factory, says, *more):
    out = tmp_path_factory.mktemp(flag.strip("-"))
    code, stdout, stderr = run_in_process(*one_stage(flag, teacher, out, mnist_root, *more))
    assert code == 0, stderr
    assert says in stdout
    return out


@pytest.fixture(scope="module")
def consistency(chain, mnist_root, tmp_path_factory):
    return one_stage_run("--consistency", chain / "guidance" / "ema.pt", mnist_root, tmp_path_factory,
                         "consistency distillation to 2 steps")


def test_a_smoke_consistency_stage_samples_in_its_steps_everywhere(consistency, classifier_file, mnist_root,
                                                                    tmp_path):
    weights = consistency / "consistency-2" / "ema.pt"
    state = runs.load_checkpoint(str(weights))
    assert state["config"]["distill"]["stage"] == "consistency" and state["config"]["distill"]["steps"] == 2
    assert {key: state["config"]["sampling"][key] for key in distill.CONSISTENCY_SAMPLING} == \
        distill.CONSISTENCY_SAMPLING and state["config"]["sampling"]["steps"] == 2 and state["step"] == 6
    assert "ddim, 1 steps" in samples_everywhere(weights, classifier_file, mnist_root, tmp_path, "--steps", "1")


def test_an_interrupted_consistency_stage_resumes_exactly(consistency, chain, mnist_root, tmp_path, monkeypatch):
    real, calls = distill_losses.consistency_loss, []

    def interrupted(*args):  # Ctrl-C during the 4th step
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(distill_losses, "consistency_loss", interrupted)
    args = one_stage("--consistency", chain / "guidance" / "ema.pt", tmp_path, mnist_root)
    code, _, stderr = run_in_process(*args)
    assert code == 128 + signal.SIGINT, stderr
    assert runs.load_checkpoint(str(tmp_path / "consistency-2" / "ckpt.pt"))["step"] == 4
    monkeypatch.setattr(distill_losses, "consistency_loss", real)
    code, _, stderr = run_in_process(*args)
    assert code == 0, stderr
    assert_same_run(tmp_path / "consistency-2" / "ckpt.pt", consistency / "consistency-2" / "ckpt.pt")


def test_a_consistency_stage_from_a_few_step_student_is_one_line(chain, tmp_path):
    code, _, stderr = run_in_process("distill.py", str(chain / "steps-2" / "ema.pt"), "--consistency", "--out",
                                     str(tmp_path))
    assert_one_line_error(code, stderr, "consistency distillation starts from main.py's weights or a guidance")


STUDENT = os.path.join(os.path.dirname(runs.PRETRAINED), "mnist-cpu-4steps.pt")


def test_the_shipped_student_is_bf16_on_disk_fp32_when_loaded_and_samples_in_its_4_steps(tmp_path):
    folder = os.path.dirname(STUDENT)
    assert sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)) < 8 * 2**20
    stored = torch.load(STUDENT, map_location="cpu", weights_only=True)["ema"]
    assert {w.dtype for w in stored.values()} == {torch.bfloat16}
    model, cfg = runs.load_ema_model(STUDENT, "cpu")
    assert cfg["distill"]["stage"] == "progressive" and cfg["distill"]["steps"] == cfg["sampling"]["steps"] == 4
    assert cfg["distill"]["guide"] == "mnist-cpu-guide.pt"  # it learnt the shipped teacher's autoguidance
    for name, w in model.state_dict().items():
        assert w.dtype == torch.float32 and torch.equal(w, stored[name].float())
    code, _, stderr = run_in_process("loadmodel.py", STUDENT, "--num-samples", "10", "--out", str(tmp_path))
    assert code == 0, stderr
    assert "0/4 " in stderr and np.load(tmp_path / "samples.npz")["arr_0"].shape == (10, 28, 28, 1)


def test_r1_is_the_squared_gradient_of_the_discriminator_at_the_real_digits():
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(5)
    a = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    linear = lambda x, y: (a * x).flatten(1).sum(1) + y  # grad_x = a everywhere
    torch.testing.assert_close(distill_losses.r1_penalty(linear, x, labels), a.pow(2).sum())
    quadratic = lambda x, y: 0.5 * x.pow(2).flatten(1).sum(1) * (1 + y)  # grad_x = (1 + y) x
    expected = ((1 + labels.view(-1, 1, 1, 1)) * x).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(distill_losses.r1_penalty(quadratic, x, labels), expected)
    penalty = distill_losses.r1_penalty(quadratic, x, labels)
    assert penalty.requires_grad  # differentiable again: the discriminator's weights learn from it


def adversarial_setup(steps=1):
    """A 2-step teacher and a student of `steps` steps copied from it (smoke size, T = 64,
    v-prediction), the adversarial loss between them, and one batch's digits and draws."""
    teacher, cfg = conditional_model()
    cfg = config.merge_config(cfg, {"diffusion": {"T": 64, "schedule": "cosine", "prediction": "v"}})
    teacher, cfg = student_of(teacher, cfg)
    cfg = config.merge_config(cfg, {"distill": {"stage": "adversarial", "steps": steps}})
    loss_of = distill_losses.stage_loss(cfg, teacher, teacher_steps=2)
    x_0 = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    draws = training.draw(cfg, torch.Generator().manual_seed(0), x_0.shape, slice(None), torch.arange(8) % 10)
    return teacher, loss_of, x_0, draws


def test_the_discriminator_starts_from_the_runs_seed_and_leaves_the_global_generator_alone():
    teacher, loss_of, _, _ = adversarial_setup()
    cfg = config.merge_config(conditional_model()[1], {"distill": {"stage": "adversarial", "steps": 1}})
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = distill_losses.stage_loss(cfg, teacher, teacher_steps=2).discriminator.state_dict()
    torch.testing.assert_close(torch.rand(3), expected_next)  # stage_loss drew nothing from the global generator
    first = loss_of.discriminator.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)  # the run's seed, whatever came before


def test_the_teachers_digits_start_each_sample_at_its_own_level():
    teacher, cfg = conditional_model()
    sched = distill_losses.trailing_schedule(tuple(cfg["diffusion"].items()), 2)
    labels = torch.arange(4)
    model = lambda x, t: teacher(x, t, labels)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    level = torch.tensor([1, 0, 1, 0])
    with torch.no_grad():  # each sample keeps its own label when only some of them run at a level
        digits = distill_losses.teacher_digits(teacher, x, level, sched, "eps", (labels,))
        both_steps = samplers.ddim_sample(model, x, sched, "eps", progress=False)
        last_step = samplers.denoise(model, x, 0, sched, "eps", False)[0]  # from the lowest level: its x_0
    torch.testing.assert_close(digits[level == 1], both_steps[level == 1])
    torch.testing.assert_close(digits[level == 0], last_step[level == 0])
    assert (both_steps - last_step).abs().max() > 1e-3


def test_the_adversarial_loss_steps_the_discriminator_then_scores_the_students_one_step_digits():
    teacher, loss_of, x_0, draws = adversarial_setup()
    before = {k: v.clone() for k, v in loss_of.discriminator.state_dict().items()}
    network = lambda x, t, *inputs: teacher(x, t, *inputs)
    loss = loss_of(network, x_0, draws)
    after = loss_of.discriminator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # one step of its Adam
    inputs = (draws.labels, draws.w)
    x_T = helper.q_sample(x_0, draws.t, draws.eps, loss_of.sched)
    assert (draws.t == 0).all() and (x_T - draws.eps).abs().max() < 1e-3  # sampling's x_T, up to sqrt(alpha_bar_T) x_0
    with torch.no_grad():
        fake = samplers.denoise(lambda x, t: teacher(x, t, *inputs), x_T, 0, loss_of.sched, "v", False)[0]
        anchor = samplers.ddim_sample(lambda x, t: teacher(x, t, *inputs), x_T, loss_of.teacher_sched, "v",
                                      progress=False)
        adversarial = torch.nn.functional.softplus(-loss_of.discriminator(fake, draws.labels)).mean()
    assert loss_of.sched.T == 1 and loss_of.teacher_sched.T == 2
    expected = adversarial + distill_losses.ADVERSARIAL["anchor"] * (fake - anchor).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss.detach(), expected)
    assert (fake - anchor).abs().max() > 1e-3  # one step is not two: the anchor pulls
    faded = loss_of(network, x_0, draws._replace(progress=1.0))  # the anchor's weight is 0 at the end
    with torch.no_grad():
        adversarial = torch.nn.functional.softplus(-loss_of.discriminator(fake, draws.labels)).mean()
    torch.testing.assert_close(faded.detach(), adversarial)


def test_a_two_step_finish_scores_the_students_digits_from_x_T_and_from_noised_training_digits():
    teacher, loss_of, x_0, draws = adversarial_setup(steps=2)
    assert set(draws.t.tolist()) == {0, 1}  # both of the student's levels
    network = lambda x, t, *inputs: teacher(x, t, *inputs)
    loss = loss_of(network, x_0, draws)
    inputs, top = (draws.labels, draws.w), draws.t == 1
    student = lambda x, t: teacher(x, t, *inputs)
    x_T = draws.eps  # the top level, up to sqrt(alpha_bar_T) x_0
    x_middle = helper.q_sample(x_0, torch.zeros_like(draws.t), draws.eps, loss_of.sched)
    with torch.no_grad():
        fake = torch.where(top.view(-1, 1, 1, 1), samplers.denoise(student, x_T, 1, loss_of.sched, "v", False)[0],
                           samplers.denoise(student, x_middle, 0, loss_of.sched, "v", False)[0])
        anchor = torch.where(top.view(-1, 1, 1, 1), samplers.ddim_sample(student, x_T, loss_of.teacher_sched, "v",
                                                                         progress=False),
                             fake)  # from the middle level the teacher's one step is the student's copy of it
        adversarial = torch.nn.functional.softplus(-loss_of.discriminator(fake, draws.labels)).mean()
    expected = adversarial + distill_losses.ADVERSARIAL["anchor"] * (fake - anchor).pow(2).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)


def test_the_discriminator_loss_of_an_undecided_discriminator_is_2_log_2():
    x = torch.randn(4, 1, 28, 28)
    undecided = lambda x, y: 0.0 * x.flatten(1).sum(1)
    torch.testing.assert_close(distill_losses.discriminator_loss(undecided, x, x.flip(0), torch.arange(4)),
                               torch.tensor(2 * math.log(2)))
    discriminator = distill_losses.Discriminator(1, 10, 8, 28)
    assert discriminator(x, torch.tensor([0, 3, 9, 10])).shape == (4,)  # 10: the null label
    rgb = distill_losses.Discriminator(3, 10, 8, 32)
    assert rgb(torch.randn(2, 3, 32, 32), torch.tensor([1, 10])).shape == (2,)


@pytest.fixture(scope="module")
def adversarial(chain, mnist_root, tmp_path_factory):
    return one_stage_run("--adversarial", chain / "steps-2" / "ema.pt", mnist_root, tmp_path_factory,
                         "adversarial finish to 1 step from")


def test_a_smoke_adversarial_stage_samples_in_one_step_everywhere(adversarial, classifier_file, mnist_root, tmp_path):
    weights = adversarial / "adversarial" / "ema.pt"
    state = runs.load_checkpoint(str(weights))
    assert state["config"]["distill"]["stage"] == "adversarial" and state["config"]["distill"]["steps"] == 1
    sampling = distill.adversarial_sampling(1)
    assert {key: state["config"]["sampling"][key] for key in sampling} == sampling and \
        state["config"]["sampling"]["steps"] == 1 and state["step"] == 6
    discriminator = runs.load_checkpoint(str(adversarial / "adversarial" / "ckpt.pt"), training=True)["loss"]
    assert set(discriminator) == {"discriminator", "optimizer"}
    assert "ddim, 1 steps" in samples_everywhere(weights, classifier_file, mnist_root, tmp_path, steps=1)


def test_a_smoke_two_step_adversarial_stage_samples_in_two_steps(chain, mnist_root, tmp_path_factory, tmp_path):
    out = one_stage_run("--adversarial", chain / "steps-2" / "ema.pt", mnist_root, tmp_path_factory,
                        "adversarial finish to 2 steps from", "--to", "2")
    state = runs.load_checkpoint(str(out / "adversarial-2" / "ema.pt"))
    sampling = distill.adversarial_sampling(2)
    assert state["config"]["distill"]["steps"] == 2 and state["config"]["sampling"]["steps"] == 2
    assert {key: state["config"]["sampling"][key] for key in sampling} == sampling and sampling["eta"] == 1
    code, _, stderr = run_in_process("loadmodel.py", str(out / "adversarial-2" / "ema.pt"), "--out", str(tmp_path))
    assert code == 0, stderr
    assert "ddim" in stderr and "| 0/2 [" in stderr


def test_an_interrupted_adversarial_stage_resumes_exactly_with_its_discriminator(adversarial, chain, mnist_root,
                                                                                 tmp_path, monkeypatch):
    real, calls = distill_losses.AdversarialLoss.__call__, []

    def interrupted(self, *args):  # Ctrl-C during the 4th step
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args)

    monkeypatch.setattr(distill_losses.AdversarialLoss, "__call__", interrupted)
    args = one_stage("--adversarial", chain / "steps-2" / "ema.pt", tmp_path, mnist_root)
    code, _, stderr = run_in_process(*args)
    assert code == 128 + signal.SIGINT, stderr
    assert runs.load_checkpoint(str(tmp_path / "adversarial" / "ckpt.pt"))["step"] == 4
    monkeypatch.setattr(distill_losses.AdversarialLoss, "__call__", real)
    code, _, stderr = run_in_process(*args)
    assert code == 0, stderr
    ours, theirs = (runs.load_checkpoint(str(folder / "adversarial" / "ckpt.pt"), training=True)
                    for folder in (tmp_path, adversarial))
    for name, weights in theirs["loss"]["discriminator"].items():
        assert torch.equal(ours["loss"]["discriminator"][name], weights), name
    assert_same_run(tmp_path / "adversarial" / "ckpt.pt", adversarial / "adversarial" / "ckpt.pt")


def test_the_adversarial_stage_follows_the_rounds_or_finishes_a_few_step_student_alone(adversarial, tmp_path):
    teacher = {"distill": {"stage": "", "steps": 0}, "model": {"num_classes": 10}}
    assert distill.plan(teacher, 8, 1, adversarial=True) == [
        ("guidance", 0), ("progressive", 4), ("progressive", 2), ("progressive", 1), ("adversarial", 1)]
    assert distill.plan(teacher, 8, 2, consistency=True, adversarial=True) == [
        ("guidance", 0), ("consistency", 2), ("adversarial", 2)]
    for stage in ("progressive", "consistency"):
        for to in (1, 2, 4):
            assert distill.plan({**teacher, "distill": {"stage": stage, "steps": 4}}, 32, to, adversarial=True) == [
                ("adversarial", to)]
    with pytest.raises(config.UserError, match="the teacher samples in 1 step: an adversarial finish to 2 steps"):
        distill.plan({**teacher, "distill": {"stage": "progressive", "steps": 1}}, 32, 2, adversarial=True)
    with pytest.raises(config.UserError, match="distilled further by --adversarial alone"):
        distill.plan({**teacher, "distill": {"stage": "consistency", "steps": 2}}, 32, 1)
    code, _, stderr = run_in_process("distill.py", str(adversarial / "adversarial" / "ema.pt"), "--adversarial",
                                     "--out", str(tmp_path))
    assert_one_line_error(code, stderr, "this teacher is an adversarial student already")
