"""Conditional training, classifier-free guidance, inpainting and interpolation: the math
against closed forms and the scripts end to end on the smoke preset."""
import numpy as np
import pytest
import torch

import config
import data
import distill
import edit
import evaluate
import guidance
import helper
import loadmodel
import main
import runs
import training
from helper import Schedule
from model import Model
from test_scripts import assert_one_line_error, run_in_process, run_script


def conditional_model(seed=0):
    """A smoke-sized conditional U-Net whose label embedding matters (random, not zero)."""
    cfg = config.merge_config(config.get_config("smoke"), {"model": {"num_classes": 10}})
    torch.manual_seed(seed)
    model = Model.from_config(cfg).eval()
    with torch.no_grad():
        model.label_emb.weight.normal_()
    return model, cfg


def inputs(B=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, 28, 28, generator=generator), torch.tensor([0, 5, 12, 19])[:B]


def test_draw_replaces_the_requested_share_of_labels_with_the_null_label():
    _, cfg = conditional_model()
    y = torch.randint(0, 10, (200000,), generator=torch.Generator().manual_seed(0))
    for p in (0.0, 0.1, 0.5, 1.0):
        cfg = config.merge_config(cfg, {"training": {"p_uncond": p}})
        dropped = training.draw(cfg, torch.Generator().manual_seed(1), (len(y), 1, 1, 1), slice(None), y).labels
        null = dropped == 10
        assert null.double().mean().item() == pytest.approx(p, abs=0.005)
        assert torch.equal(dropped[~null], y[~null])  # the others keep their own label


def test_an_unconditional_model_has_no_label_embedding_and_refuses_labels():
    cfg = config.get_config("smoke")
    model = Model.from_config(cfg)
    assert not any("label" in name for name in model.state_dict())
    x, t = inputs(2)
    with pytest.raises(AssertionError):
        model(x, t, torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_guidance_zero_is_unconditional_one_is_conditional_and_it_extrapolates_in_x0_and_eps(prediction):
    model, _ = conditional_model()
    x, t = inputs()
    y, null = torch.tensor([3, 7, 1, 9]), torch.full((4,), 10)
    sched = Schedule(helper.cosine_betas(20))
    with torch.no_grad():
        conditional, unconditional = model(x, t, y), model(x, t, null)
        guided = {w: guidance.Guided(model, y, w, 10)(x, t) for w in (0.0, 1.0, 3.0)}
    torch.testing.assert_close(guided[0.0], unconditional, rtol=0, atol=0)
    torch.testing.assert_close(guided[1.0], conditional, rtol=0, atol=0)
    assert (conditional - unconditional).abs().max() > 1e-3  # the label matters

    def implied(output):
        return helper.predict_x0_eps(output, x, t, sched, prediction)

    (x0_c, eps_c), (x0_u, eps_u), (x0_g, eps_g) = implied(conditional), implied(unconditional), implied(guided[3.0])
    torch.testing.assert_close(x0_g, x0_u + 3 * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_g, eps_u + 3 * (eps_c - eps_u), rtol=1e-4, atol=1e-4)


def test_guided_passes_run_as_one_call_of_batch_2B_equal_to_two_calls():
    model, _ = conditional_model()
    x, t = inputs()
    y, null = torch.tensor([3, 7, 1, 9]), torch.full((4,), 10)
    batches = []

    def counting(x_t, t_, labels):
        batches.append(len(x_t))
        return model(x_t, t_, labels)

    with torch.no_grad():
        guided = guidance.Guided(counting, y, 2.0, 10)(x, t)
        separate = model(x, t, null) + 2.0 * (model(x, t, y) - model(x, t, null))
    assert batches == [8]
    torch.testing.assert_close(guided, separate, rtol=1e-5, atol=1e-5)


def test_all_null_labels_or_w_zero_run_the_null_pass_alone_at_every_call():
    model, _ = conditional_model()
    x, t = inputs()
    batches = []

    def counting(x_t, t_, labels):
        batches.append((len(x_t), labels.tolist()))
        return model(x_t, t_, labels)

    for labels, w in ((torch.full((4,), 10), 2.0), (torch.tensor([3, 7, 1, 9]), 0.0)):
        guided = guidance.Guided(counting, labels, w, 10)
        with torch.no_grad():
            for _ in range(3):
                guided(x, t)
    assert batches == [(4, [10] * 4)] * 6


def test_guidance_interval_guides_only_at_the_noise_levels_inside_it():
    model, cfg = conditional_model()
    x, t = inputs()  # t = 0, 5, 12, 19; Guided sees one t per call, as in the samplers
    y = torch.tensor([3, 7, 1, 9])
    sigma = Schedule.from_config(cfg["diffusion"]).edm_sigmas()
    lo, hi = sigma[4].item(), sigma[12].item()  # (lo, hi] holds t = 5..12
    network = runs.guided_network(model, config.with_sampling(cfg, guidance=3.0, guidance_interval=[lo, hi]), y)
    assert network.guided_at.nonzero().flatten().tolist() == list(range(5, 13))
    plain, conditional = guidance.Guided(model, y, 3.0, 10), guidance.Guided(model, y, 1.0, 10)
    with torch.no_grad():
        for step in t.tolist():
            at = torch.full((4,), step)
            expected = (plain if 5 <= step <= 12 else conditional)(x, at)
            torch.testing.assert_close(network(x, at), expected, rtol=0, atol=0)
    assert not torch.equal(plain(x, torch.full((4,), 5)), conditional(x, torch.full((4,), 5)))


def test_autoguidance_is_the_network_plus_w_times_its_difference_from_the_guide():
    """Karras et al. 2024: output(x_t, t, y) + w (output(x_t, t, y) - guide(x_t, t, y)), the guide
    conditioned like the network; w = 1 is the network alone, and a guide equal to the network
    leaves it unchanged at any w. An unconditional network is guided the same way."""
    model, cfg = conditional_model()
    guide, _ = conditional_model(seed=1)
    x, t = inputs()
    y = torch.tensor([3, 7, 1, 9])
    calls = []

    def counting(network):
        def call(x_t, t_, labels):
            calls.append(network)
            return network(x_t, t_, labels)
        return call

    with torch.no_grad():
        main_out, guide_out = model(x, t, y), guide(x, t, y)
        assert (main_out - guide_out).abs().max() > 1e-2  # the two networks differ
        for w in (0.0, 2.5):
            torch.testing.assert_close(guidance.Guided(model, y, w, 10, guide=guide)(x, t),
                                       guide_out + w * (main_out - guide_out), rtol=0, atol=0)
            torch.testing.assert_close(guidance.Guided(model, y, w, 10, guide=model)(x, t), main_out,
                                       rtol=1e-6, atol=1e-6)
        assert torch.equal(guidance.Guided(counting(model), y, 1.0, 10, guide=counting(guide))(x, t), main_out)
        assert calls == [model]  # w = 1: the guide is not called
        unconditional = Model.from_config(config.get_config("smoke")).eval()
        other = Model.from_config(config.get_config("smoke")).eval()
        network = runs.guided_network(unconditional, config.with_sampling(config.get_config("smoke"), guidance=2.0), None,
                                      other)
        expected = other(x, t) + 2.0 * (unconditional(x, t) - other(x, t))
        torch.testing.assert_close(network(x, t), expected, rtol=0, atol=0)


def test_a_runs_guide_is_its_ema_at_that_fraction_of_its_steps(conditional_run, mnist_root, tmp_path):
    """conditional_run trains 8 steps at a constant learning rate with training.guides [0.5]: its
    guide-0.5.pt is bit for bit the EMA of the same run stopped after 4 steps."""
    main.main(["--preset", "smoke", "--conditional", "--data-root", mnist_root, "--out", str(tmp_path),
               "--steps", "4"])
    guide = torch.load(conditional_run / "guide-0.5.pt", weights_only=True)
    stopped = torch.load(tmp_path / "ema.pt", weights_only=True)
    assert guide["step"] == 4 and guide.keys() == {"config", "step", "ema"}
    assert all(torch.equal(guide["ema"][name], weights) for name, weights in stopped["ema"].items())
    final = torch.load(conditional_run / "ema.pt", weights_only=True)["ema"]
    assert not all(torch.equal(guide["ema"][name], weights) for name, weights in final.items())


def test_loadmodel_and_evaluate_sample_with_a_guide(conditional_run, classifier_file, mnist_root, tmp_path):
    ckpt, guide = str(conditional_run / "ckpt.pt"), str(conditional_run / "guide-0.5.pt")
    loadmodel.main([ckpt, "--guide", guide, "--guidance", "2", "--num-samples", "10", "--steps", "3",
                    "--out", str(tmp_path)])
    guided = np.load(tmp_path / "samples.npz")["arr_0"]
    loadmodel.main([ckpt, "--guidance", "2", "--num-samples", "10", "--steps", "3", "--out", str(tmp_path)])
    assert guided.shape == (10, 28, 28, 1) and not np.array_equal(guided, np.load(tmp_path / "samples.npz")["arr_0"])
    evaluate.main([ckpt, "--guide", guide, "--num-samples", "20", "--guidance", "1,2", "--steps", "3",
                   "--no-compile", "--data-root", mnist_root, "--classifier", str(classifier_file[0]),
                   "--out", str(tmp_path), "--json", str(tmp_path / "eval.json")])
    rows = __import__("json").load(open(tmp_path / "eval.json"))["rows"]
    assert [row.get("guidance") for row in rows] == [None, 1.0, 2.0]
    assert rows[2]["name"] == "ddpm, 3 steps, autoguided by guide-0.5.pt, w = 2" and rows[2]["guide"] == guide


def test_a_run_whose_config_names_a_guide_samples_autoguided_by_default(mnist_root, tmp_path):
    """The cpu preset's way: training.guides saves guide-F.pt and sampling.guide names it; main.py's
    grid, loadmodel.py, evaluate.py and edit.py then sample with it, unless --guide none."""
    run = tmp_path / "run"
    main.main(["--preset", "smoke", "--conditional", "--data-root", mnist_root, "--out", str(run),
               "--set", "training.guides=[0.5]", "--set", "sampling.guide=guide-0.5.pt", "--set", "sampling.guidance=2"])
    assert (run / "samples.png").exists()

    def drawn(*flags):
        loadmodel.main([str(run / "ema.pt"), "--num-samples", "10", "--steps", "3", "--out", str(tmp_path), *flags])
        return np.load(tmp_path / "samples.npz")["arr_0"]
    default, explicit, free = drawn(), drawn("--guide", str(run / "guide-0.5.pt")), drawn("--guide", "none")
    assert np.array_equal(default, explicit) and not np.array_equal(default, free)
    (run / "guide-0.5.pt").unlink()
    code, _, stderr = run_in_process("loadmodel.py", str(run / "ema.pt"))
    assert_one_line_error(code, stderr, "guide-0.5.pt beside it, which is not there; --guide none")


def test_the_cpu_preset_samples_autoguided_by_a_guide_its_runs_save_and_students_do_not():
    cfg = config.get_config("cpu")
    assert [f"guide-{fraction:g}.pt" for fraction in cfg["training"]["guides"]] == [cfg["sampling"]["guide"]]
    student = distill.student_config(cfg, "guidance", 0, [], 1.0)
    assert student["sampling"]["guide"] == "" and student["training"]["guides"] == []


def test_a_conditional_model_without_labels_samples_with_the_null_label():
    model, cfg = conditional_model()
    cfg = config.with_sampling(cfg, sampler="ddim", steps=4)
    free = runs.sample(model, cfg, 3, seed=0, device="cpu", progress=False)
    null = runs.sample(model, cfg, 3, seed=0, device="cpu", labels=torch.full((3,), 10), progress=False)
    asked = runs.sample(model, cfg, 3, seed=0, device="cpu", labels=torch.tensor([1, 2, 3]), progress=False)
    assert torch.equal(free, null) and not torch.equal(free, asked)


def test_slerp_keeps_the_endpoints_and_the_norm_of_gaussian_noise():
    generator = torch.Generator().manual_seed(0)
    z_0, z_1 = torch.randn(5, 1, 28, 28, generator=generator), torch.randn(5, 1, 28, 28, generator=generator)
    torch.testing.assert_close(edit.slerp(z_0, z_1, 0.0), z_0)
    torch.testing.assert_close(edit.slerp(z_0, z_1, 1.0), z_1)
    for a in (0.25, 0.5, 0.75):
        norms = edit.slerp(z_0, z_1, a).flatten(1).norm(dim=1)
        assert norms.div(28).sub(1).abs().max() < 0.08  # |z| ~ sqrt(784) = 28, as for z_0 and z_1
    assert ((z_0 + z_1) / 2).flatten(1).norm(dim=1).div(28).max() < 0.8  # a straight line would shrink it


@pytest.mark.parametrize("mask", edit.MASKS)
def test_region_masks_hide_a_part_and_keep_the_rest(mask):
    known = edit.region_mask(mask, 28)
    hidden = (known == 0).double().mean().item()
    assert hidden == pytest.approx(0.25 if mask == "centre" else 0.5)


@pytest.mark.parametrize("resample", [1, 3])
def test_repaint_keeps_the_known_pixels_of_the_original(digits, resample):
    model, cfg = conditional_model()
    sched = Schedule(helper.cosine_betas(20)).respace(helper.spaced_timesteps(20, 6, "trailing"))
    original = digits[:3]
    known = edit.region_mask("left", 28)
    network = guidance.Guided(model, torch.tensor([4, 4, 4]), 2.0, 10)
    generator = torch.Generator().manual_seed(0)
    filled = edit.repaint(network, torch.randn(original.shape, generator=generator), sched, original, known, "eps",
                          "beta", True, generator, resample, progress=False)
    before, after = data.to_digits(original), data.to_digits(filled)
    keep = known[0, 0].bool().numpy()
    assert np.abs(before[:, keep].astype(int) - after[:, keep].astype(int)).max() <= 1
    assert np.abs(before[:, ~keep].astype(int) - after[:, ~keep].astype(int)).max() > 50  # the rest is generated


def test_loadmodel_digit_all_writes_ten_rows_and_labels(conditional_run, tmp_path):
    loadmodel.main([str(conditional_run / "ckpt.pt"), "--digit", "all", "--num-samples", "20", "--batch-size", "8",
                    "--guidance", "2", "--out", str(tmp_path)])
    archive = np.load(tmp_path / "samples.npz")
    assert archive["arr_0"].shape == (20, 28, 28, 1)
    assert archive["labels"].dtype == np.int64 and archive["labels"].tolist() == sorted(list(range(10)) * 2)
    assert (tmp_path / "trajectory.png").stat().st_size > 0 and (tmp_path / "samples_grid.png").stat().st_size > 0


def test_loadmodel_draws_each_digit_from_a_conditional_checkpoint_unless_guidance_is_zero(conditional_run, tmp_path):
    loadmodel.main([str(conditional_run / "ckpt.pt"), "--num-samples", "10", "--out", str(tmp_path / "default")])
    assert np.load(tmp_path / "default" / "samples.npz")["labels"].tolist() == list(range(10))
    loadmodel.main([str(conditional_run / "ckpt.pt"), "--num-samples", "4", "--guidance", "0",
                    "--out", str(tmp_path / "w0")])
    archive = np.load(tmp_path / "w0" / "samples.npz")
    assert archive["arr_0"].shape == (4, 28, 28, 1) and "labels" not in archive  # the null label: unconditional


@pytest.mark.parametrize("flags, preset, num_classes", [
    ([], "cpu", 10), (["--unconditional"], "cpu", 0), ([], "paper", 0), ([], "smoke", 0), (["--conditional"], "smoke", 10),
])
def test_the_cpu_preset_is_conditional_and_the_flags_choose(flags, preset, num_classes, mnist_root):
    cfg, _, _ = main.resolve(main.parse_args(["--preset", preset, "--data-root", mnist_root, *flags]))
    assert cfg["model"]["num_classes"] == num_classes


def test_edit_inpaint_and_interpolate_write_their_figures(conditional_run, mnist_root, tmp_path):
    edit.main(["inpaint", str(conditional_run / "ckpt.pt"), "--index", "5", "--count", "2", "--num-samples", "3",
               "--mask", "centre", "--digit", "3", "--resample", "2", "--data-root", mnist_root, "--out", str(tmp_path)])
    archive = np.load(tmp_path / "inpainted.npz")
    assert archive["arr_0"].shape == (6, 28, 28, 1) and archive["labels"].tolist() == [3] * 6
    edit.main(["interpolate", str(conditional_run / "ckpt.pt"), "--frames", "4", "--pairs", "2", "--steps", "5",
               "--out", str(tmp_path)])
    for name in ("inpaint.png", "interpolation.png", "labels.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_inpainting_an_unconditional_model_labels_the_originals(trained, tmp_path, mnist_root, mnist):
    edit.main(["inpaint", str(trained / "ckpt.pt"), "--index", "0", "--count", "3", "--num-samples", "1",
               "--data-root", mnist_root, "--out", str(tmp_path)])
    _, test_labels, _ = data.load_data(mnist, train=False)
    assert np.load(tmp_path / "inpainted.npz")["labels"].tolist() == test_labels[:3].tolist()


def test_evaluate_scores_requested_digit_accuracy_of_a_labelled_npz(classifier_file, mnist_root, mnist, tmp_path):
    images, labels = evaluate.data_images(mnist, train=False)
    pick = np.random.default_rng(0).permutation(len(images))[:500]
    wrong = (labels[pick].numpy() + 1) % 10
    for name, asked in (("right", labels[pick].numpy()), ("wrong", wrong)):
        np.savez(tmp_path / f"{name}.npz", arr_0=images[pick], labels=asked.astype(np.int64))
        evaluate.main([str(tmp_path / f"{name}.npz"), "--data-root", mnist_root, "--classifier",
                       str(classifier_file[0]), "--json", str(tmp_path / f"{name}.json")])
    right, wrong = (__import__("json").load(open(tmp_path / f"{n}.json"))["rows"][1] for n in ("right", "wrong"))
    assert right["accuracy"] > 0.9 and wrong["accuracy"] < 0.1


def test_evaluate_warms_the_compiled_network_up_once_per_network_batch(monkeypatch, capsys):
    """Guided rows call the network on 2B, unguided ones (w = 0 or 1, an unconditional model, the
    steps outside a guidance interval) on B = min(N, SAMPLE_BATCH): one warm-up for each."""
    _, cfg = conditional_model()
    batches, guides = [], []

    def warming(model, cfg, sampler, steps, n, seed, device, labels, guide=None):  # records the network's batch
        w = cfg["sampling"]["guidance"]
        batches.append(2 * n if labels is not None and guide is None and w not in (0, 1) else n)
        guides.append(guide is not None and w != 1)
    monkeypatch.setattr(evaluate, "generate", warming)
    labels = torch.zeros(1200, dtype=torch.long)
    for guidances, chosen, n, expected in [([None, 2.0], {"guidance": 1.5}, 1200, [1000]),
                                           ([None, 0.0, 1.0], {"guidance": 1.5}, 1200, [500, 1000]),
                                           ([None], {"guidance": 2.0, "guidance_interval": [0.5, 20.0]}, 300, [300, 600])]:
        batches.clear()
        evaluate.warm_up(None, config.with_sampling(cfg, **chosen), guidances, n, 0, "cpu", labels[:n])
        assert sorted(batches) == expected, guidances
    batches.clear()
    evaluate.warm_up(None, cfg, [None], 1200, 0, "cpu")  # no labels: an unconditional model
    assert batches == [500]
    assert "network batches of 500 in" in capsys.readouterr().out.splitlines()[-1]
    for guidances, interval in [([1.0, 2.0, 3.0], []), ([2.0], [0.5, 20.0])]:  # autoguidance: B each, guide called
        batches.clear()
        guides.clear()
        chosen = config.with_sampling(cfg, guidance_interval=interval)
        evaluate.warm_up(None, chosen, guidances, 1200, 0, "cpu", labels, guide="a guide")
        assert batches == [500] and guides == [True]


def test_evaluate_a_conditional_checkpoint_over_guidance_weights(conditional_run, classifier_file, mnist_root,
                                                                 tmp_path):
    evaluate.main([str(conditional_run / "ckpt.pt"), "--num-samples", "20", "--guidance", "0,2", "--steps", "3",
                   "--guidance-interval", "0.5", "20", "--sampler", "dpm++", "--eta", "1", "--spacing", "quadratic",
                   "--labels", "uniform", "--no-compile", "--data-root", mnist_root,
                   "--classifier", str(classifier_file[0]),
                   "--out", str(tmp_path), "--json", str(tmp_path / "eval.json")])
    rows = __import__("json").load(open(tmp_path / "eval.json"))["rows"]
    assert [row.get("guidance") for row in rows] == [None, 0.0, 2.0]
    assert rows[2]["name"] == ("dpm++, 3 steps, eta = 1, quadratic spacing, w = 2 for sigma in (0.5, 20], "
                               "N/10 of each digit")
    assert all(0 <= row["accuracy"] <= 1 for row in rows[1:])
    assert (tmp_path / "guidance.png").stat().st_size > 0


@pytest.mark.parametrize("args, fragment", [
    (["loadmodel.py", "COND", "--digit", "12"], "this checkpoint knows the classes 0-9"),
    (["loadmodel.py", "UNCOND", "--digit", "3"], "--digit needs a conditional checkpoint"),
    (["loadmodel.py", "UNCOND", "--guidance", "2"], "--guidance needs a conditional checkpoint"),
    (["loadmodel.py", "COND", "--digit", "3", "--guidance", "-1"], "sampling.guidance must not be negative"),
    (["loadmodel.py", "COND", "--digit", "all", "--num-samples", "15"], "must be a multiple of 10"),
    (["loadmodel.py", "COND", "--num-samples", "15"], "must be a multiple of 10"),
    (["loadmodel.py", "COND", "--digit", "3", "--guidance", "0"], "cannot be asked for a digit"),
    (["main.py", "--conditional", "--unconditional"], "not allowed with argument"),
    (["edit.py", "inpaint", "COND", "--index", "10000"], "runs past the 10000 held-out images"),
    (["edit.py", "inpaint", "COND", "--index", "-1"], "runs past the 10000 held-out images"),
    (["evaluate.py", "COND", "--guidance", "1,-2"], "guidance must not be negative"),
    (["evaluate.py", "UNCOND", "--labels", "uniform"], "--labels needs a conditional checkpoint"),
    (["loadmodel.py", "COND", "--guidance-interval", "2", "1"], "guidance_interval must be [] or [lo, hi]"),
    (["loadmodel.py", "UNCOND", "--guidance-interval", "0.3", "5"], "--guidance needs a conditional checkpoint"),
    (["loadmodel.py", "COND", "--guide", "UNCOND"], "its model.num_classes is 0, not 10"),
    (["evaluate.py", "UNCOND", "--guide", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
    (["edit.py", "inpaint", "UNCOND", "--guide", "COND"], "its model.num_classes is 10, not 0"),
])
def test_bad_control_input_gets_one_line_and_exit_2(args, fragment, conditional_run, trained, mnist_root):
    paths = {"COND": str(conditional_run / "ckpt.pt"), "UNCOND": str(trained / "ckpt.pt")}
    args = [paths.get(arg, arg) for arg in args]
    if args[0] == "edit.py":
        args += ["--data-root", mnist_root]
    code, _, stderr = run_in_process(*args)
    assert_one_line_error(code, stderr, fragment)


def test_edit_reports_a_bad_flag_in_one_line_from_the_command_line(conditional_run, mnist_root):
    code, _, stderr = run_script("edit.py", "inpaint", str(conditional_run / "ckpt.pt"), "--mask", "middle",
                                 "--data-root", mnist_root)
    assert_one_line_error(code, stderr, "invalid choice")
