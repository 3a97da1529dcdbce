"""Where the time goes: training and sampling throughput of a preset's U-Net under each
speed option, its FLOPs, and the machine's own matmul ceiling measured in the same run.

    python benchmark.py [--preset P] [--device D] [--variants V,...] [--json PATH] [--profile]

Every variant runs in a fresh process (so peak memory and compile caches are its own): warm-up
steps first, then the median of 10 timed repeats. The compile variants compile the training
network as training.compile does and the sampling network as sampling.compile does (weights
frozen); "inductor layouts" lets inductor turn the convolutions channels_last, as it does by
default. Where the device has no native bf16 (an AVX2 CPU), only the fp32 variants run unless
--variants names others. --profile also prints, per variant, where one training step spends
its time (torch.profiler).
"""
import json
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch

import config
import helper
import processes
import runs
from config import UserError

# name -> (bf16 autocast, torch.compile, inductor's own layouts)
VARIANTS = {
    "eager fp32": (False, False, False),
    "fp32 + compile (inductor layouts)": (False, True, True),
    "fp32 + compile": (False, True, False),
    "bf16 autocast": (True, False, False),
    "bf16 + compile (inductor layouts)": (True, True, True),
    "bf16 + compile": (True, True, False),
}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rate(x):
    """A throughput to three significant digits, without exponents: 142, 12.1, 6.16."""
    return f"{x:.0f}" if x >= 100 else f"{x:#.3g}"


def default_variants(device):
    """Every variant the device computes natively: the fp32 ones alone where bf16 is emulated."""
    return [name for name, (bf16, _, _) in VARIANTS.items() if not bf16 or runs.native_bf16(device)]


def matmul_ceiling(device, dtype, n=4096, repeats=5):
    """TFLOP/s of an n x n x n matrix multiply: the most this device does in `dtype`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / median_seconds(lambda: a @ b, device, 2, repeats) / 1e12


def network_inputs(cfg, batch_size, device, t):
    """Arguments of one network call: x (B, C, S, S), t (B,) at step t and, for a conditional
    model, labels (B,) cycling through the digits."""
    size, classes = cfg["data"]["image_size"], cfg["model"]["num_classes"]
    x = torch.randn(batch_size, cfg["data"]["channels"], size, size, device=device)
    t = torch.full((batch_size,), t, dtype=torch.long, device=device)
    return (x, t) + ((torch.arange(batch_size, device=device) % classes,) if classes else ())


def flops_per_image(model, cfg, device, batch_size, backward):
    """FLOPs of one image through the network (forward, or forward + backward), by
    torch.utils.flop_counter on a real batch."""
    from torch.utils.flop_counter import FlopCounterMode
    inputs = network_inputs(cfg, batch_size, device, 0)
    with FlopCounterMode(display=False) as counter:
        out = model(*inputs)
        if backward:
            out.sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def profile_step(step, device, top=15):
    """Where one call of step() spends its time, as two markdown tables: by model-level op (the
    outermost op, its callees included: a convolution's layout copies count as convolution) and
    by kernel (each op's own time, so e.g. all copies together)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    events = prof.events()
    total_attr, self_attr = (("device_time_total", "self_device_time_total") if device == "cuda"
                             else ("cpu_time_total", "self_cpu_time_total"))

    def table(title, pairs):
        shares = {}
        for key, us in pairs:
            shares[key] = shares.get(key, 0.0) + us
        whole = sum(shares.values())
        lines = [f"| {title} | ms per step | share |", "|---|---:|---:|"]
        for key, us in sorted(shares.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"| {key} | {us / 1e3:.1f} | {us / whole:.0%} |")
        return "\n".join(lines)

    outermost = [(e.name.removeprefix("autograd::engine::evaluate_function: "), getattr(e, total_attr))
                 for e in events if e.cpu_parent is None]
    return (table("model-level op", outermost) + "\n\n"
            + table("kernel (own time)", [(e.name, getattr(e, self_attr)) for e in events]))


def run_variant(preset, device, name, sample_batch, with_profile=False):
    """Train-step and sampling throughput of one variant; runs in its own process."""
    import training
    bf16, compile_model, layouts = VARIANTS[name]
    cfg = config.merge_config(config.get_config(preset), {"training": {
        "bf16": "on" if bf16 else "off", "compile": compile_model, "device": device}})
    tr, sched = cfg["training"], helper.Schedule.from_config(cfg["diffusion"])
    run = training.new_training(cfg, device, processes.Processes(device), training.algorithm_1(cfg))
    run.network = runs.compile_network(run.model, layouts=layouts) if compile_model else run.model
    run.step = 100  # past the EMA's warm-up
    x_0, _, *y = network_inputs(cfg, tr["batch_size"], device, 0)
    x_0 = x_0.clamp(-1, 1)

    def train_step():  # the whole step of main.py: draws, loss, backward, clipping, AdamW, EMA
        training.train_step(run, x_0, *y)

    inputs = network_inputs(cfg, sample_batch, device, sched.T // 2)
    ema = run.ema.eval()
    sampler_network = runs.compile_network(ema, frozen=True, layouts=layouts) if compile_model else ema

    @torch.no_grad()
    def sample_step():  # one network evaluation of runs.sample, compiled as sampling.compile does
        with runs.autocast(device, bf16):
            sampler_network(*inputs)

    start = time.perf_counter()
    train_step()  # the first call compiles, if compiling
    first_train = time.perf_counter() - start
    train_seconds = median_seconds(train_step, device, 2, 10)
    start = time.perf_counter()
    sample_step()
    first_sample = time.perf_counter() - start
    sample_seconds = median_seconds(sample_step, device, 2, 10)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    row = {"variant": name, "train_img_s": tr["batch_size"] / train_seconds,
           "sample_img_s": sample_batch / sample_seconds,
           "compile_s": (first_train - train_seconds) + (first_sample - sample_seconds) if compile_model else 0.0,
           "peak_mem_mb": peak / 2 ** 20}
    if with_profile:
        row["train_profile"] = profile_step(train_step, device)
    return row


def parse_args(argv=None):
    parser = runs.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpu", help="whose U-Net and batch size (default: cpu)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sample-batch", type=runs.positive_int, default=256, help="batch of sampling steps")
    parser.add_argument("--variants", help="comma-separated subset to run (default: default_variants)")
    parser.add_argument("--json", help="also write the numbers as JSON here")
    parser.add_argument("--profile", action="store_true", help="also print where a training step spends its time")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = config.get_config(args.preset)
    device = runs.resolve_device(args.device)
    bf16 = runs.native_bf16(device)
    names = args.variants.split(",") if args.variants else default_variants(device)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    from model import Model
    model = Model.from_config(cfg).to(device)
    train_flops = flops_per_image(model, cfg, device, 8, backward=True)
    sample_flops = flops_per_image(model, cfg, device, 8, backward=False)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16} if bf16 else {"fp32": torch.float32}
    ceilings = {name: matmul_ceiling(device, dtype) for name, dtype in dtypes.items()}
    best = "bf16" if bf16 else "fp32"  # the ceiling the utilisation columns divide by
    print(f"{args.preset} preset on {device} ({torch.get_num_threads()} threads): "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{train_flops / 1e9:.3f} GFLOP per training image (fwd+bwd), {sample_flops / 1e9:.3f} per sampling NFE; "
          f"matmul ceiling {', '.join(f'{v:.3f} TFLOP/s {k}' for k, v in ceilings.items())}"
          f"{'' if bf16 else ' (bf16 is emulated here)'}")

    rows = []
    context = multiprocessing.get_context("spawn")
    for name in names:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            row = pool.submit(run_variant, args.preset, device, name, args.sample_batch, args.profile).result()
        row["train_tflops"] = row["train_img_s"] * train_flops / 1e12
        row["sample_tflops"] = row["sample_img_s"] * sample_flops / 1e12
        row["train_mfu"] = row["train_tflops"] / ceilings[best]
        row["sample_mfu"] = row["sample_tflops"] / ceilings[best]
        rows.append(row)
        print(f"  {name}: {rate(row['train_img_s'])} train img/s, {rate(row['sample_img_s'])} sampling NFE·img/s", flush=True)
        if args.profile:
            print(f"\none training step, {name}:\n{row['train_profile']}\n", flush=True)

    baseline = rows[0]
    lines = [f"| variant | train img/s | × | train TFLOP/s | of {best} ceiling | sample img·NFE/s | × | "
             f"of {best} ceiling | compile s | peak MB |", "|---|" + "---:|" * 9]
    for row in rows:
        lines.append(f"| {row['variant']} | {rate(row['train_img_s'])} | {row['train_img_s'] / baseline['train_img_s']:.2f} | "
                     f"{row['train_tflops']:.3f} | {row['train_mfu']:.0%} | {rate(row['sample_img_s'])} | "
                     f"{row['sample_img_s'] / baseline['sample_img_s']:.2f} | {row['sample_mfu']:.0%} | "
                     f"{row['compile_s']:.0f} | {row['peak_mem_mb']:.0f} |")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "device": device, "threads": torch.get_num_threads(), "ceiling_of": best,
                       "train_gflop_per_image": train_flops / 1e9, "sample_gflop_per_image": sample_flops / 1e9,
                       "ceiling_tflops": ceilings, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    runs.run(main)
