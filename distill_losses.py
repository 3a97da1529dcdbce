"""The losses of distill.py's stages (docs/distill.md), each of (network, x_0, draws) as
training.train_step calls them (draws: training.draw's t, eps, labels dropped to null as in
training, and w ~ U(distill.guidance_range)); stage_loss picks the one a student's config names."""
import functools
import math

import torch

import guidance
import helper
import runs
import samplers
from helper import Schedule


def network_inputs(draws):
    """What a student takes after (x_t, t): the label and, for a guidance student, w."""
    return tuple(x for x in (draws.labels, draws.w) if x is not None)


def guidance_loss(teacher, guide, sched, null, network, x_0, draws):
    """Meng et al. 2023 stage 1: at x_t of a training digit (t uniform, as main.py trains), the
    student's output at (x_t, t, y, w) regresses the teacher's guided output (guidance.guided_output):
    uncond + w (cond - uncond) without a guide, for a label dropped to null the unconditional
    output; with a guide (autoguidance), guide(x_t, t, y) + w (teacher(x_t, t, y) - guide(x_t, t, y))."""
    x_t = helper.q_sample(x_0, draws.t, draws.eps, sched)
    with torch.no_grad():
        if guide is None:
            output, guide_output = guidance.conditional_and_unconditional(
                teacher, x_t, draws.t, draws.labels, torch.full_like(draws.labels, null))
        else:
            output, guide_output = (net(x_t, draws.t, draws.labels).float() for net in (teacher, guide))
    target = guidance.guided_output(output, guide_output, draws.w.view(-1, 1, 1, 1))
    return (network(x_t, draws.t, draws.labels, draws.w).float() - target).pow(2).mean()


def student_level_in_teacher(k, factor=2):
    """The teacher's level (of factor * N, trailing) that is the student's level k (of N): the
    trailing spacing's N levels are every factor-th level of its factor * N, the top one included."""
    return (k + 1) * factor - 1


def two_step_target(x_t, x_next, alpha_bar_t, alpha_bar_next):
    """Salimans & Ho 2022 Algorithm 2: the x_0 whose one DDIM step from x_t (level a_t) lands on
    x_next (level a_next), where the teacher's two steps landed. With alpha = sqrt(a) and
    sigma = sqrt(1 - a):  x~ = (x_next - (sigma_next / sigma_t) x_t) / (alpha_next - (sigma_next / sigma_t) alpha_t);
    at the last step, sigma_next = 0, it is x_next itself."""
    ratio = ((1 - alpha_bar_next) / (1 - alpha_bar_t)) ** 0.5
    return (x_next - ratio * x_t) / (alpha_bar_next ** 0.5 - ratio * alpha_bar_t ** 0.5)


@functools.cache
def trailing_schedule(diffusion, steps):
    """The schedule of `steps` DDIM steps, trailing-spaced, that the students sample with
    (diffusion: the config's section as a tuple of items)."""
    sched = Schedule.from_config(dict(diffusion))
    return sched.respace(helper.spaced_timesteps(sched.T, steps, "trailing"))


def student_and_teacher_schedules(diffusion, steps):
    """The schedules of a student of `steps` DDIM steps and of its teacher at 2 steps per student
    step (the student's levels are every other level of the teacher's)."""
    return trailing_schedule(diffusion, steps), trailing_schedule(diffusion, 2 * steps)


def alpha_bar_at(sched, level, shape):
    """alpha_bar at each level (B,) of sched, 1 at level -1 (the clean image), shaped to broadcast."""
    return helper.extract(sched.alpha_bars_prev, level + 1, shape)  # alpha_bars_prev[i] = alpha_bars[i - 1]


def teacher_step(teacher, x_t, level_t, level_r, sched, prediction, clip_x0=False):
    """One DDIM step (eta = 0) of the teacher, a model(x, t), from x_t at level_t to level_r (B,):
    sqrt(a_r) x_0 + sqrt(1 - a_r) eps of its (x_0, eps); at level -1 its x_0."""
    x_0, eps, _ = samplers.denoise(teacher, x_t, level_t, sched, prediction, clip_x0)
    return samplers.ddim_step(x_0, eps, alpha_bar_at(sched, level_r, x_t.shape))


def teacher_two_steps(teacher, x_t, k, teacher_sched, prediction, clip_x0):
    """Two DDIM steps (eta = 0) of the teacher (a model(x, t)) from x_t at the student's level k
    (B,): its levels 2k + 1 -> 2k -> 2k - 1 (clean after level 0)."""
    for level in (student_level_in_teacher(k), student_level_in_teacher(k) - 1):
        x_t = teacher_step(teacher, x_t, level, level - 1, teacher_sched, prediction, clip_x0)
    return x_t


def progressive_target(teacher, x_t, k, student_sched, teacher_sched, prediction, clip_x0):
    """What the student outputs at x_t, level k (B,), so that its one DDIM step lands where the
    teacher's two do (two_step_target), in the student's parameterisation."""
    x_next = teacher_two_steps(teacher, x_t, k, teacher_sched, prediction, clip_x0)
    alpha_bar_t = helper.extract(student_sched.alpha_bars, k, x_t.shape)
    alpha_bar_next = helper.extract(student_sched.alpha_bars_prev, k, x_t.shape)
    x_0 = two_step_target(x_t, x_next, alpha_bar_t, alpha_bar_next)
    _, eps = helper.predict_x0_eps(x_0, x_t, k, student_sched, "x0")
    return helper.training_target(x_0, eps, k, student_sched, prediction)


def progressive_loss(teacher, student_sched, teacher_sched, prediction, clip_x0, network, x_0, draws):
    """Salimans & Ho 2022 Algorithm 2: at x_t of a training digit, on one of the student's N levels
    k = draws.t (uniform), the student's output regresses progressive_target. In v-prediction this
    squared error is their "SNR + 1" weighting."""
    k, inputs = draws.t, network_inputs(draws)
    x_t = helper.q_sample(x_0, k, draws.eps, student_sched)
    with torch.no_grad():
        target = progressive_target(lambda x, t: teacher(x, t, *inputs), x_t, k, student_sched, teacher_sched,
                                    prediction, clip_x0)
    output = network(x_t, student_sched.timesteps.to(x_0.device)[k], *inputs)
    return (output.float() - target.float()).pow(2).mean()


# Consistency distillation (Song et al. 2023) with ECT's gap and distance (Geng et al. 2024). The
# consistency function f(x_t, t) is the x_0 the student implies at level t (with the cosine
# schedule and v-prediction x_0 = cos(phi) x_t - sin(phi) v), and x itself for the clean image,
# level -1: f(x, 0) = x. Trained on pairs of levels r < t of one trajectory of the guided
# teacher's probability-flow ODE, it learns to map every point of a trajectory to its end.

ECT = {"q": 2.0, "k": 8.0, "b": 1.0,   # the gap's schedule, gap_levels
       "stages": 4}                    # the gap halves this many times over the consistency stage


def gap_levels(level_t, sigmas, progress):
    """ECT's shrinking gap: at stage s = floor(progress * stages) of the run,
        sigma_r = max(0, sigma_t (1 - q^-(s + 1) (1 + k sigmoid(-b sigma_t)))),
    so the first stage pairs most levels with the clean image (the teacher's x_0 is the target)
    and each later one halves the gap. Returns the level at or below sigma_r, at least one below
    level_t (B,); -1, the clean image, where sigma_r is below the lowest level."""
    sigmas = sigmas.to(level_t.device)
    sigma_t, stage = sigmas[level_t], min(int(progress * ECT["stages"]), ECT["stages"] - 1)
    ratio = 1 - ECT["q"] ** -(stage + 1) * (1 + ECT["k"] * torch.sigmoid(-ECT["b"] * sigma_t))
    level_r = torch.searchsorted(sigmas, (ratio * sigma_t).clamp(min=0), right=True) - 1
    return torch.minimum(level_r, level_t - 1)


def consistency_function(model, x, level, sched, prediction):
    """f(x, level): the x_0 a model(x, t) implies at each level (B,), x itself at level -1."""
    x_0, _, _ = samplers.denoise(model, x, level.clamp(min=0), sched, prediction, False)
    return torch.where(level.view(-1, 1, 1, 1) < 0, x, x_0)


def consistency_loss(teacher, sched, prediction, network, x_0, draws):
    """Consistency distillation at x_t of a training digit, level t uniform over the T levels (as
    Song et al. draw it: the top level, where sampling starts, is trained too; ECT's log-normal
    levels never reached it and scored worse, docs/distill.md) and r = gap_levels(t): the
    student's f at (x_t, t) regresses its own f, without gradient, at the teacher's
    x_r = teacher_step(x_t, t -> r). ECT's distance is the pseudo-Huber sqrt(|d|^2 + c^2) - c
    with c = 0.00054 sqrt(dim x) (Song & Dhariwal 2023), weighted by 1 / (sigma_t - sigma_r)."""
    inputs = network_inputs(draws)
    sigmas, level_t = sched.edm_sigmas(), draws.t
    level_r = gap_levels(level_t, sigmas, draws.progress)
    x_t = helper.q_sample(x_0, level_t, draws.eps, sched)
    student = lambda x, t: network(x, t, *inputs)
    with torch.no_grad():
        x_r = teacher_step(lambda x, t: teacher(x, t, *inputs), x_t, level_t, level_r, sched, prediction)
        target = consistency_function(student, x_r, level_r, sched, prediction)
    squared = (consistency_function(student, x_t, level_t, sched, prediction) - target).pow(2).flatten(1).sum(1)
    c = 0.00054 * x_0[0].numel() ** 0.5
    sigmas = sigmas.to(x_0.device, torch.float32)
    gap = sigmas[level_t] - torch.where(level_r < 0, 0.0, sigmas[level_r.clamp(min=0)])
    return (((squared + c ** 2).sqrt() - c) / gap).mean()


# The adversarial finish (as DMD2, Yin et al. 2024, without its distribution matching; ADD, Sauer
# et al. 2023, for more than one step): the student's digits, one call from each of its levels,
# against a discriminator trained beside it from scratch, both with the non-saturating loss
# (Goodfellow et al. 2014); the discriminator regularised by R1 (Mescheder et al. 2018); the
# student anchored to its teacher's digits from the same x_t by a squared error whose weight
# falls to 0 over the stage.

ADVERSARIAL = {"width": 32,                     # the discriminator's channels at full resolution
               "lr": 2e-4, "betas": (0.0, 0.99),  # its Adam
               "r1_gamma": 0.1,                 # R1's weight: gamma / 2 E |grad_x D(x, y)|^2 at the real digits
               "anchor": 0.1}                   # the anchor's weight at the start of the stage
"""Measured against width 16, gamma 1 and anchor 0.3 and 1 (docs/distill.md)."""


class Discriminator(torch.nn.Module):
    """A class-conditional projection discriminator (Miyato & Koyama 2018): strided convolutions
    with leaky ReLUs to a map of ceil(size / 8)^2 positions, then one dense layer over all of them
    to features h(x), so that it judges the whole digit (each position alone sees 17 x 17
    pixels); D(x, y) = psi(h) + <embed(y), h>; y may be the null label, as the student's."""

    def __init__(self, channels, num_classes, width, size):
        super().__init__()
        layers = []
        for c_in, c_out, stride in ((channels, width, 1), (width, 2 * width, 2), (2 * width, 4 * width, 2),
                                    (4 * width, 4 * width, 2)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, stride, 1), torch.nn.LeakyReLU(0.2)]
        self.features = torch.nn.Sequential(*layers)
        self.psi = torch.nn.Linear(4 * width, 1)
        self.embed = torch.nn.Embedding(num_classes + 1, 4 * width)
        self.dense = torch.nn.Linear(4 * width * math.ceil(size / 8) ** 2, 4 * width)

    def forward(self, x, y):
        h = torch.nn.functional.leaky_relu(self.dense(self.features(x).flatten(1)), 0.2)
        return self.psi(h).squeeze(1) + (self.embed(y) * h).sum(1)


def r1_penalty(discriminator, real, labels):
    """R1 (Mescheder et al. 2018): E |grad_x D(x, y)|^2 at the real digits, differentiable again."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real, labels).sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def discriminator_loss(discriminator, real, fake, labels):
    """The discriminator's non-saturating loss, softplus(-D(real)) + softplus(D(fake)), and R1."""
    logits_real, logits_fake = discriminator(real, labels), discriminator(fake, labels)
    return (torch.nn.functional.softplus(-logits_real).mean() + torch.nn.functional.softplus(logits_fake).mean()
            + ADVERSARIAL["r1_gamma"] / 2 * r1_penalty(discriminator, real, labels))


def teacher_digits(teacher, x_t, level, sched, prediction, inputs=()):
    """The digits of the teacher, model(x, t, *inputs), from x_t by DDIM (eta = 0) on its levels of
    sched, each sample from its own level (B,) down; `inputs` are per sample (B, ...), like x_t.
    A level's step runs on the samples that have started there, so none is run in vain."""
    x_t = x_t.clone()
    for i in range(int(level.max()), -1, -1):
        run = level >= i
        here = torch.full((int(run.sum()),), i, device=x_t.device)
        x_t[run] = teacher_step(lambda x, t: teacher(x, t, *(v[run] for v in inputs)), x_t[run], here, here - 1,
                                sched, prediction)
    return x_t


class AdversarialLoss:
    """The adversarial finish's loss of (network, x_0, draws), with the discriminator and its
    optimiser as a state of its own (state_dict: the run's checkpoint keeps it). On one of the
    student's K levels k = draws.t (uniform) of sched, x_k = q_sample(x_0, k, draws.eps): at the
    top level sampling's x_T (up to sqrt(alpha_bar_T) x_0 ~ 5e-5 x_0), below it a noised training
    digit, as sampling in K steps re-noises each call's digit. A call first steps the
    discriminator (discriminator_loss, in float32) on the training digits x_0 against the student's
    digits G = f(x_k, k), then returns the student's loss
        softplus(-D(G, y)) + anchor (1 - progress) |G - teacher's digits from x_k|^2,
    the teacher sampling deterministically (DDIM eta 0) on its own levels below k (teacher_digits;
    the trailing levels of K steps are among those of any multiple of K)."""

    def __init__(self, teacher, teacher_sched, sched, prediction, discriminator):
        self.teacher, self.teacher_sched, self.sched, self.prediction = teacher, teacher_sched, sched, prediction
        self.discriminator = discriminator
        self.optimizer = torch.optim.Adam(discriminator.parameters(), lr=ADVERSARIAL["lr"], betas=ADVERSARIAL["betas"])

    def __call__(self, network, x_0, draws):
        k, inputs = draws.t, network_inputs(draws)
        x_t = helper.q_sample(x_0, k, draws.eps, self.sched)
        with torch.no_grad():
            level_in_teacher = student_level_in_teacher(k, self.teacher_sched.T // self.sched.T)
            anchor = teacher_digits(self.teacher, x_t, level_in_teacher, self.teacher_sched, self.prediction, inputs)
        fake, _, _ = samplers.denoise(lambda x, t: network(x, t, *inputs), x_t, k, self.sched, self.prediction, False)
        with torch.autocast(x_0.device.type, enabled=False):
            loss = discriminator_loss(self.discriminator, x_0.float(), fake.detach(), draws.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            adversarial = torch.nn.functional.softplus(-self.discriminator(fake, draws.labels)).mean()
        anchor_weight = ADVERSARIAL["anchor"] * (1 - draws.progress)
        return adversarial + anchor_weight * (fake - anchor).pow(2).flatten(1).sum(1).mean()

    def state_dict(self):
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        runs.load_weights(self.discriminator, state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])


def stage_loss(cfg, teacher, guide=None, teacher_steps=0):
    """The loss of the stage cfg describes, as training.train calls it (teacher_steps: the DDIM
    steps a few-step teacher samples with, for the adversarial stage's anchor)."""
    if cfg["distill"]["stage"] == "guidance":
        return functools.partial(guidance_loss, teacher, guide, Schedule.from_config(cfg["diffusion"]),
                                 cfg["model"]["num_classes"])
    if cfg["distill"]["stage"] == "consistency":
        return functools.partial(consistency_loss, teacher, Schedule.from_config(cfg["diffusion"]),
                                 cfg["diffusion"]["prediction"])
    diffusion = tuple(cfg["diffusion"].items())
    if cfg["distill"]["stage"] == "adversarial":
        with torch.random.fork_rng(devices=[]):  # the discriminator's initialisation, from the run's seed
            torch.manual_seed(cfg["training"]["seed"])
            discriminator = Discriminator(cfg["data"]["channels"], cfg["model"]["num_classes"], ADVERSARIAL["width"],
                                          cfg["data"]["image_size"])
        return AdversarialLoss(teacher, trailing_schedule(diffusion, teacher_steps),
                               trailing_schedule(diffusion, cfg["distill"]["steps"]),
                               cfg["diffusion"]["prediction"],
                               discriminator.to(runs.resolve_device(cfg["training"]["device"])))
    schedules = student_and_teacher_schedules(diffusion, cfg["distill"]["steps"])
    return functools.partial(progressive_loss, teacher, *schedules, cfg["diffusion"]["prediction"],
                             cfg["sampling"]["clip_x0"])
