"""Distil a trained model into one that samples in a few network calls (docs/distill.md).

    python distill.py [TEACHER] [--out DIR] [--minutes M] [--start N] [--to N] [--consistency] [--adversarial]
                      [--set SECTION.KEY=VALUE ...] [--overwrite] [--data-root DIR] [--device D]

1. Guidance distillation (Meng et al. 2023, stage 1), for a conditional teacher: a student
   copied from the teacher's EMA weights, with the guidance weight w as one more input, learns
   the teacher's guided output in one pass of batch B instead of two: guide + w (teacher - guide),
   the guide being the teacher's unconditional output (classifier-free guidance) or, when the
   teacher samples autoguided (its sampling.guide, or --guide), its weaker snapshot.
2. Progressive distillation (Salimans & Ho 2022, Algorithm 2): each round a student, copied
   from its teacher, learns in one DDIM step the two DDIM steps its teacher takes, so the steps
   halve: --start N (the first teacher's DDIM steps) -> N/2 -> ... -> --to.
   Or, with --consistency, consistency distillation (Song et al. 2023) with ECT's gap and
   distance (Geng et al. 2024): one stage, whose student maps any point of the guided teacher's
   ODE to its end, x_0, and samples in --to (1 or 2) steps.
3. With --adversarial, an adversarial finish (as DMD2, Yin et al. 2024; ADD, Sauer et al. 2023):
   a student of --to steps (1, 2 or 4), copied from the last few-step student (or from the
   teacher, when it is one), trained against a small class-conditional discriminator learnt
   beside it from the training digits, anchored to its teacher's digits by a regression that
   fades out.

Each stage trains with main.py's own loop (training.train: time budget, atomic checkpoints,
Ctrl-C/SIGTERM, exact resume, progress bar) in a folder of its own under DIR (guidance/,
steps-16/, steps-8/, ..., adversarial/ or adversarial-N/), and ends with an ordinary weights
file, its ema.pt, whose config says what it is and how many steps it samples with;
loadmodel.py, evaluate.py and edit.py load it like any other. The same command again resumes
an interrupted stage and skips finished ones. --minutes is the whole budget: the last round,
whose student is kept, gets two shares, every other stage one (stage_minutes).
"""
import functools
import os
import time

import config
import distill_losses
import runs
import training
from config import UserError
from model import Model


def student_sampling(steps):
    """How a progressive student of `steps` DDIM steps samples by default: its eta, and its guidance
    weight w only at the noise levels sigma in an interval (Kynkaanniemi et al. 2024; w = 1
    elsewhere), as measured best for the 4-step student (docs/distill.md). A student of 1 or
    2 steps has at most one level there, so it guides at every level. --set sampling.eta=...
    changes them."""
    if steps >= 4:
        return {"eta": 0.6, "guidance": 1.6, "guidance_interval": [0.5, 3.0]}
    return {"eta": 0.5, "guidance": 1.2, "guidance_interval": []}


CONSISTENCY_SAMPLING = {"sampler": "ddim", "eta": 1.0, "spacing": "trailing", "clip_x0": False, "guidance": 1.6,
                        "guidance_interval": []}
"""How a consistency student samples: DDIM with eta = 1 from x_T, where alpha_bar_T ~ 0, is the
consistency models' multistep sampler (Song et al. 2023 Alg. 1): x_0 = f(x_T, T), then, for
2 steps, x_0 noised afresh to the middle level (trailing: sigma = 1) and f again. w = 1.6 scored
best of 1.2, 1.6, 2 and 2.5 (docs/distill.md)."""


def adversarial_sampling(steps):
    """How an adversarial student samples: one network call from x_T, x_0 = f(x_T, T), and for more
    steps that x_0 noised afresh to the next level (DDIM eta = 1 from x_T), where the stage
    trained it on noised training digits, and f again. w = 1.2 scored best of 1, 1.1, 1.2, 1.5
    and 2 at 1 step; at 2 and 4 steps 1.1 tied 1 in FID with more precision (docs/distill.md)."""
    return {"sampler": "ddim", "eta": 1.0, "spacing": "trailing", "clip_x0": False,
            "guidance": 1.2 if steps == 1 else 1.1, "guidance_interval": []}


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("teacher", nargs="?",
                        help="checkpoint to distil (default: the shipped weights, else out/ckpt.pt)")
    parser.add_argument("--out", default=os.path.join("out", "distill"),
                        help="folder of the stages (default: out/distill)")
    parser.add_argument("--minutes", type=runs.positive_float, default=60.0,
                        help="time budget of all the stages; the last round gets twice a share (default: 60)")
    parser.add_argument("--start", type=runs.positive_int, default=32,
                        help="DDIM steps of the first progressive teacher (a power of two; default: 32)")
    parser.add_argument("--to", type=runs.positive_int,
                        help="steps of the last student (a power of two; default: 4, with --consistency 2, with "
                             "--adversarial 1)")
    parser.add_argument("--consistency", action="store_true",
                        help="after the guidance stage, one consistency stage instead of progressive rounds")
    parser.add_argument("--adversarial", action="store_true",
                        help="finish with a student of --to steps trained against a discriminator (from a "
                             "few-step student: that stage alone)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="settings",
                        help="change one config value of every student (distill.lr=1e-4, training.batch_size=64)")
    parser.add_argument("--guide", help="the guidance stage's guide: " + runs.GUIDE_HELP.split(": ", 1)[1])
    parser.add_argument("--overwrite", action="store_true", help="start every stage over")
    parser.add_argument("--data-root", help="where torchvision datasets are (default: the teacher's data.root)")
    parser.add_argument("--device", help="auto, cpu or cuda (default: auto)")
    return parser.parse_args(argv)


def power_of_two(n):
    return n > 0 and n & (n - 1) == 0


def plan(teacher_cfg, start, to, consistency=False, adversarial=False):
    """The stages from this teacher: ("guidance", 0) for a conditional teacher trained by main.py,
    then ("progressive", N) for N = start/2, start/4, ..., to (a progressive teacher of S steps:
    from S/2), or ("consistency", to); and, if adversarial, ("adversarial", to) (from a few-step
    student of at least `to` steps, that stage alone). A UserError for a teacher or step counts
    that cannot be distilled so."""
    if not (power_of_two(start) and power_of_two(to)):
        raise UserError(f"--start {start} and --to {to} must be powers of two (each round halves the steps)")
    stage, steps = teacher_cfg["distill"]["stage"], teacher_cfg["distill"]["steps"]
    if stage == "adversarial":
        raise UserError("this teacher is an adversarial student already: nothing is left to distil")
    if adversarial and stage in ("progressive", "consistency"):
        if to > steps:
            raise UserError(f"the teacher samples in {steps} step{'s' * (steps > 1)}: an adversarial finish to {to} "
                            f"steps needs a teacher of at least as many")
        return [("adversarial", to)]
    if stage == "consistency":
        raise UserError("a consistency student is distilled further by --adversarial alone")
    if consistency and stage not in ("", "guidance"):
        raise UserError(f"consistency distillation starts from main.py's weights or a guidance-distilled student; "
                        f"this teacher is a {stage} student")
    if stage == "progressive":
        start = steps
    if to >= start:
        raise UserError(f"the teacher samples in {start} steps: nothing to distil to {to}")
    stages = []
    if stage == "":
        if teacher_cfg["model"]["num_classes"] == 0:
            raise UserError("guidance distillation needs a conditional teacher (model.num_classes > 0); this one is "
                            "unconditional")
        stages.append(("guidance", 0))
    if consistency:
        stages.append(("consistency", to))
    while start > to and not consistency:
        start //= 2
        stages.append(("progressive", start))
    return stages + [("adversarial", to)] * adversarial


def student_config(cfg, stage, steps, settings, minutes, guide=""):
    """The student's config: the teacher's, marked with its stage and step count (and the guide
    file whose autoguidance a guidance student learns, "" for classifier-free guidance), training
    on distill.lr for `minutes`; a progressive student samples with DDIM at its steps. `settings`
    (--set) apply last."""
    settings = [runs.parse_setting(setting) for setting in settings]
    lr = functools.reduce(config.merge_config, settings, cfg)["distill"]["lr"]
    cfg = config.merge_config(cfg, {
        "model": {"guidance_embedding": cfg["model"]["num_classes"] > 0},
        "distill": {"stage": stage, "steps": steps, **({"guide": guide} if stage == "guidance" else {})},
        "training": {"lr": lr, "warmup_steps": 0, "lr_decay": "cosine", "minutes": minutes, "steps": 0,
                     "extra_ema_decays": [], "guides": []},
        "sampling": {"guide": ""}})  # a student takes w as its input: its guidance is learnt
    if stage == "progressive":
        cfg = config.merge_config(cfg, {"sampling": {
            "sampler": "ddim", "steps": steps, "clip_x0": False, "spacing": "trailing", **student_sampling(steps)}})
    if stage == "consistency":
        cfg = config.merge_config(cfg, {"sampling": {"steps": steps, **CONSISTENCY_SAMPLING}})
    if stage == "adversarial":
        cfg = config.merge_config(cfg, {"sampling": {"steps": steps, **adversarial_sampling(steps)}})
    cfg = functools.reduce(config.merge_config, settings, cfg)
    config.validate_config(cfg)
    return cfg


def default_teacher():
    if os.path.exists(runs.PRETRAINED):
        return runs.PRETRAINED
    return os.path.join("out", "ckpt.pt")


def frozen(network, cfg):
    """A teacher's (or its guide's) network, frozen: compiled, with its weights as constants, when
    cfg compiles training."""
    network = network.eval().requires_grad_(False)
    return runs.compile_network(network, frozen=True) if cfg["training"]["compile"] else network


def distill_stage(teacher_path, stage, steps, args, minutes, out):
    """Train one student from the teacher at teacher_path into `out` (resuming it there, or
    skipping it when it is done); returns the student's weights file."""
    device = runs.resolve_device(args.device or "auto")
    teacher_state = runs.load_checkpoint(teacher_path)
    settings = list(args.settings)
    if args.data_root:
        settings.append(f"data.root={args.data_root}")
    settings.append(f"training.device={device}")
    teacher_cfg = teacher_state["config"]
    guide_file = runs.guide_path(args.guide, teacher_cfg, teacher_path) if stage == "guidance" else None
    cfg = student_config(teacher_cfg, stage, steps, settings, minutes, os.path.basename(guide_file or ""))
    weights = os.path.join(out, "ema.pt")
    with runs.RunLock(out):
        try:
            cfg, state = training.guard_run_folder(cfg, None, out, args.overwrite)
        except training.RunComplete:
            print(f"{out} is finished; skipping it")
            return weights
        name = {"guidance": "guidance distillation", "progressive": "progressive distillation",
                "consistency": "consistency distillation", "adversarial": "adversarial finish"}[stage]
        if stage != "guidance":
            name += f" to {steps} step" + "s" * (steps > 1)
        if guide_file:
            name += f" of autoguidance by {guide_file}"
        print(f"{name} from {teacher_path}: {minutes:.1f} min budget, into {out}")
        started = time.perf_counter()
        teacher = Model.from_config(teacher_cfg)
        runs.load_weights(teacher, teacher_state["ema"])
        guide = runs.load_guide(guide_file, teacher_cfg, device)
        if guide is not None:
            guide = frozen(guide, teacher_cfg)
        loss_of = distill_losses.stage_loss(cfg, frozen(teacher.to(device), teacher_cfg), guide, teacher_cfg["distill"]["steps"])
        ema, losses, lrs = training.train(cfg, out, state, loss_of=loss_of, start_from=teacher_state["ema"])
        training.finish(ema, losses, lrs, cfg, out, started)
    return weights


def main(argv=None):
    args = parse_args(argv)
    teacher = args.teacher or default_teacher()
    teacher_cfg = runs.load_checkpoint(teacher)["config"]
    to = args.to or (1 if args.adversarial else 2 if args.consistency else 4)
    stages = plan(teacher_cfg, args.start, to, args.consistency, args.adversarial)
    if args.guide not in (None, "none") and stages[0][0] != "guidance":
        raise UserError(f"--guide is for the guidance stage; '{teacher}' is a guidance-distilled student already")
    for (stage, steps), minutes in zip(stages, stage_minutes(args.minutes, len(stages))):
        out = os.path.join(args.out, stage_folder(stage, steps))
        teacher = distill_stage(teacher, stage, steps, args, minutes, out)
    print(f"the {stages[-1][1]}-step student: python loadmodel.py {teacher}")


def stage_minutes(minutes, count):
    """Each stage's share of the budget: two for the last round, one for every other stage. The
    last round's map is the hardest (its loss is the highest and still falling when its time
    is up) and its student is the one kept (docs/distill.md)."""
    share = minutes / (count + 1)
    return [share] * (count - 1) + [2 * share]


def stage_folder(stage, steps):
    if stage == "consistency" or stage == "adversarial" and steps > 1:
        return f"{stage}-{steps}"
    return stage if stage in ("guidance", "adversarial") else f"steps-{steps}"


if __name__ == "__main__":
    runs.run(main)
