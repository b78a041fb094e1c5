"""Issue 4's check on one GPU: measurement overhead, lockstep cost and NVML readings, in about 4 minutes.

    python benchmarks/gpu_check.py --out "$OUT"     # one H100; needs no network and no MLflow
    python benchmarks/gpu_check.py --smoke          # seconds of work on the CPU: checks the script end to end
    bash benchmarks/gpu_check.sh                    # the same, as the device run calls it

1. Overhead, for resnet50 and efficientnet_b3 (timm, random weights, never downloaded) at batch 256 in
   bf16-mixed with channels_last, each at timm's default input size, on one synthetic batch kept on the GPU:
   the arm's full test stage (benchmarks/overhead.py; Lightning's CSVLogger where MLflow is not installed)
   against the same model timed as timm's benchmark.py times inference (cudnn.benchmark, channels_last,
   torch.autocast bf16, warm-up steps, then a CUDA-synchronised step timer), and against a bare loop.
2. Lockstep: the two models as the two arms of one job on the one GPU, against each alone
   (benchmarks/parallel.py).
3. NVML: utilisation, power, temperature, SM clock and energy per image, as GPUTelemetry logged them in
   the last full round, each checked against a plausible range.
Writes gpu_check.json (and gpu_check.txt, the printed tables) to --out after each part.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # overhead.py, parallel.py
import overhead
import parallel

from lab.config import build_config
from lab.models import resolve_model

MODELS = ("resnet50", "efficientnet_b3")
TIMM_WARMUP_STEPS = 10  # timm's benchmark.py default (--num-warm-iter)
# Plausible ranges of GPUTelemetry's NVML metrics while a large model runs on an H100.
NVML_RANGES = {
    "gpu_util_pct_mean": (50.0, 100.0),
    "gpu_power_w_mean": (60.0, 800.0),
    "gpu_temp_c_max": (20.0, 95.0),
    "gpu_sm_clock_mhz_mean": (500.0, 2200.0),
    "energy_j_per_img": (1e-5, 1.0),
    "gpu_mem_peak_mb": (100.0, 80_000.0),
}


def timm_style(model: torch.nn.Module, device: torch.device, batch_size: int, image_size: int, steps: int,
               dtype: torch.dtype | None) -> float:
    """Seconds for `steps` inference steps timed as timm's benchmark.py (InferenceBenchmarkRunner) does."""
    model = model.to(device).eval()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)

    def sync_time(sync: bool = False) -> float:
        if sync and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def step() -> float:
        start = sync_time()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            model(x)
        return sync_time(True) - start

    with torch.no_grad():
        for _ in range(TIMM_WARMUP_STEPS):
            step()
        start = sync_time()
        for _ in range(steps):
            step()
        return sync_time(True) - start


def default_input_size(name: str) -> int:
    import timm
    from timm.data import resolve_data_config

    return int(resolve_data_config(model=timm.create_model(name, pretrained=False))["input_size"][-1])


def overhead_args(name: str, a: argparse.Namespace, image_size: int, batches: int) -> argparse.Namespace:
    argv = ["--model", name, "--device", a.device, "--image_size", str(image_size), "--batch_size",
            str(a.batch_size), "--batches", str(batches), "--rounds", str(a.rounds), "--precision", a.precision,
            "--data", "device", "--no_mlflow"]
    return overhead.parser().parse_args(argv + (["--channels_last"] if a.channels_last else []))


def batches_for(name: str, a: argparse.Namespace, image_size: int, dtype: torch.dtype | None) -> tuple[int, float]:
    """Batches for about --seconds per pass, from a short timm-style probe; and the probe's img/s."""
    model = resolve_model(name, build_config({"a": name, "b": "resnet10t", "epochs": 0, "allow_random_head": True}),
                          10).module
    if a.channels_last:
        model = model.to(memory_format=torch.channels_last)
    probe_steps = 5 if a.smoke else 10
    seconds = timm_style(model, torch.device(a.device), a.batch_size, image_size, probe_steps, dtype)
    img_per_s = probe_steps * a.batch_size / seconds
    if a.smoke:
        return 3, img_per_s
    return int(min(400, max(20, a.seconds * img_per_s / a.batch_size))), img_per_s


def check_overhead(name: str, a: argparse.Namespace, dtype: torch.dtype | None) -> dict[str, Any]:
    image_size = a.image_size or default_input_size(name)
    batches, probe = batches_for(name, a, image_size, dtype)
    args = overhead_args(name, a, image_size, batches)
    device = torch.device(a.device)

    def references(bench: overhead.Bench) -> dict[str, Any]:
        return {"timm": lambda: timm_style(bench.module.model, device, a.batch_size, image_size, batches, dtype)}

    result = overhead.measure(args, references)
    result["timm_probe_img_per_s"] = probe
    result["ratio_vs_timm"] = result["img_per_s"]["full"] / result["img_per_s"]["timm"]
    result["loop_ratio_vs_timm"] = result["full_loop_img_per_s"] / result["img_per_s"]["timm"]
    return result


def check_nvml(summary: dict[str, float], tags: dict[str, str]) -> dict[str, Any]:
    fields = {}
    for key, (lo, hi) in NVML_RANGES.items():
        value = summary.get(key)
        fields[key] = {"value": value, "range": [lo, hi], "ok": value is not None and lo <= value <= hi}
    return {"nvml": tags.get("ab.nvml"), "energy_source": tags.get("ab.energy_source"),
            "gpu_name": tags.get("ab.gpu_name"), "fields": fields, "ok": all(f["ok"] for f in fields.values())}


def environment(a: argparse.Namespace) -> dict[str, Any]:
    import lightning
    import timm

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "lightning": lightning.__version__, "timm": timm.__version__, "device": a.device,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if a.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    try:
        import mlflow

        env["mlflow"] = mlflow.__version__
    except ImportError:
        env["mlflow"] = None
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=".", help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--image_size", type=int, default=0, help="0: each model's timm default input size")
    p.add_argument("--precision", default="bf16-mixed", choices=["32", "16-mixed", "bf16-mixed"])
    p.add_argument("--no_channels_last", dest="channels_last", action="store_false")
    p.add_argument("--seconds", type=float, default=5.0, help="about this long per timed pass")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lockstep_batches", type=int, default=24, help="batches per arm in the lockstep check")
    p.add_argument("--budget_s", type=float, default=400.0, help="skip the parts not started by then")
    p.add_argument("--smoke", action="store_true", help="tiny models, few batches: checks the script on the CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.batch_size, a.image_size, a.rounds, a.lockstep_batches = 8, 32, 1, 3
    return a


def print_summary(report: dict[str, Any], out: Path) -> None:
    ratios = {name: r["ratio_vs_timm"] for name, r in report["overhead"].items() if isinstance(r, dict)}
    lockstep = report["lockstep"]["ratio"] if isinstance(report["lockstep"], dict) else float("nan")
    print("summary: " + ", ".join(f"{n} full/timm {v:.4f}" for n, v in ratios.items())
          + f", lockstep/(a+b) {lockstep:.4f}, NVML plausible: "
          + str({n: v["ok"] for n, v in report["nvml"].items()}))
    print(f"elapsed {report['elapsed_s']:.0f} s; wrote {out / 'gpu_check.json'}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    models = ("resnet10t", "mobilenetv3_small_100") if a.smoke else MODELS
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(a.precision)
    torch.backends.cudnn.benchmark = True  # as timm's benchmark.py; Lightning keeps the session's setting
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report: dict[str, Any] = {"environment": environment(a), "overhead": {}, "lockstep": None, "nvml": {}}
    text = io.StringIO()

    def save() -> None:
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.txt").write_text(text.getvalue())

    def section(title: str, fn, *args: Any) -> None:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            fn(*args)
        block = f"== {title}\n{buffer.getvalue()}"
        print(block, flush=True)
        text.write(block + "\n")
        save()

    print(json.dumps(report["environment"]), flush=True)
    for i, name in enumerate(models):
        if time.monotonic() - t0 > a.budget_s:
            report["overhead"][name] = "skipped: out of time"
            continue
        result = check_overhead(name, a, dtype)
        report["overhead"][name] = result
        report["nvml"][name] = check_nvml(result["telemetry"], result["telemetry_tags"])

        def show(result: dict[str, Any] = result, name: str = name) -> None:
            overhead.print_result(result)
            print(f"full / timm-style: {result['ratio_vs_timm']:.4f} whole call, {result['loop_ratio_vs_timm']:.4f} "
                  f"batches alone (goal >= {overhead.GOAL})")
            nvml = report["nvml"][name]
            print(f"NVML ({nvml['nvml']}, energy from {nvml['energy_source']}): " + ", ".join(
                f"{k}={v['value']:.4g}{'' if v['ok'] else ' (implausible)'}" if v["value"] is not None
                else f"{k}=missing" for k, v in nvml["fields"].items()))

        section(f"overhead {name}", show)
        if i == 0:  # the lockstep check between the two overhead checks, so a late failure still leaves both kinds
            if time.monotonic() - t0 > a.budget_s:
                report["lockstep"] = "skipped: out of time"
                continue
            largs = parallel.parser().parse_args([
                "--a", models[0], "--b", models[1], "--device", a.device, "--placement", "lockstep",
                "--image_size", str(a.image_size or default_input_size(models[0])), "--batch_size", str(a.batch_size),
                "--batches", str(a.lockstep_batches), "--rounds", str(a.rounds), "--precision", a.precision,
                "--data", "device", "--cudnn_benchmark"] + (["--channels_last"] if a.channels_last else []))
            report["lockstep"] = parallel.measure(largs)
            section("lockstep: two arms on one device vs each alone", parallel.print_result, report["lockstep"])
    report["elapsed_s"] = time.monotonic() - t0
    save()
    print_summary(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
