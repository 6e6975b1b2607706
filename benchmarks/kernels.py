"""How fast are the class-sum and SFM-loss ops against torch eager and torch.compile of the reference?

    python benchmarks/kernels.py [--quick] [--no-compile] [--no-append] [--device cpu|cuda]

Providers side by side, on the same inputs: `torch eager` (sfmkern.reference, as the CPU path runs it),
`torch.compile` (the reference's arithmetic compiled, with counts by scatter-add so no op has a data-dependent shape),
and `sfmkern` (sfmkern.ops: the Triton kernels on CUDA; on a CPU the torch backend or, with TRITON_INTERPRET=1, the
Triton interpreter — the label says which).

Bytes are counted explicitly as the traffic no implementation can avoid (each input read once, each output written
once; e = bytes per feature element):
  class_sums        N·D·e + 8N (features, labels) + 4·C·D + 8C (sums, counts)
  sfm_loss fwd      N·D·e + 8N + 4·C·D (features, labels, real flow)
  sfm_loss bwd      N·D·e + 8N + 4·C·D (write dL/dz; read labels and the saved C×D gradient G)
  sfm_loss fwd+bwd  the sum of the two

GPU: `triton.testing.do_bench` (median, after its warm-up), GB/s = bytes / time, and % of the device's measured copy
bandwidth (bytes read + written by a 1 GiB device-to-device copy). CPU: median of timed repeats; ms and ratios
only (a CPU's GB/s says nothing about the kernels). Both print one line per measurement, then the goal lines
(class_sums >= 80% of copy bandwidth at N = 1.28M, D = 768; fused sfm_loss fwd+bwd >= 2x torch eager at N = C = 1000),
and append a table to benchmarks/RESULTS.md with device, driver, versions and git sha (not with --no-append).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import _common as common
import torch

HEADER = ("| benchmark | shape | provider | ms | GB/s | % copy BW | × vs torch eager |\n"
          "|---|---|---|---:|---:|---:|---:|\n")


# ------------------------------------------------------------------------------------------------ timing
def make_timer(device: torch.device, min_time: float):
    """fn -> milliseconds: do_bench's median on CUDA; on a CPU, the median of repeats after a warm-up call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, return_mode="median"))

    def cpu_time(fn) -> float:
        fn()
        times = []
        t_end = time.perf_counter() + min_time
        while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    return cpu_time


def copy_bandwidth(timer, device: torch.device) -> float | None:
    """Device copy bandwidth in GB/s: bytes read + written by a 1 GiB device-to-device copy (CUDA only)."""
    if device.type != "cuda":
        return None
    src = torch.randn(1 << 28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * (1 << 28) * 4 / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------------------------------------ providers
def reference_sums(x: torch.Tensor, y: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's class sums and counts, with counts by scatter-add (what torch.compile gets)."""
    sums = torch.zeros(c, x.shape[1], dtype=torch.float32, device=x.device).index_add(0, y, x.float())
    counts = torch.zeros(c, dtype=torch.int64, device=x.device).scatter_add(0, y, torch.ones_like(y))
    return sums, counts


def reference_loss(x: torch.Tensor, y: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """The reference's SFM loss (flow_loss of the class means), as reference_sums computes them."""
    from sfmkern import reference

    sums, counts = reference_sums(x, y, flow.shape[0])
    return reference.flow_loss(sums / counts.to(sums.dtype)[:, None], flow)


def sfmkern_label(features: torch.Tensor) -> str:
    from sfmkern import ops

    backend = ops.backend_for(features)
    if features.device.type == "cuda":
        return "sfmkern"
    return "sfmkern [Triton interpreter]" if backend == "triton" else "sfmkern [torch backend]"


def bench_class_sums(record, timer, device, gen, n, d, c, *, compile_):
    from sfmkern import ops, reference

    features = torch.randn(n, d, generator=gen, device=device)
    labels = torch.randint(0, c, (n,), generator=gen, device=device)
    labels_sorted = labels.sort().values
    nbytes = n * d * features.element_size() + 8 * n + 4 * c * d + 8 * c
    shape = f"N={n} D={d} C={c} fp32"
    label = sfmkern_label(features)
    providers = [("torch eager", lambda: reference.class_sums(features, labels, c))]
    if compile_:
        compiled = torch.compile(reference_sums, dynamic=False)
        providers.append(("torch.compile", lambda: compiled(features, labels, c)))
    providers += [
        (f"{label} atomic", lambda: ops.class_sums(features, labels, c)),
        (f"{label} sorted", lambda: ops.class_sums(features, labels_sorted, c, sorted_labels=True)),
        (f"{label} deterministic", lambda: ops.class_sums(features, labels, c, deterministic=True)),
    ]
    for provider, fn in providers:
        record("class_sums", shape, provider, timer(fn), nbytes)


def bench_sfm_loss(record, timer, device, gen, n, flow, dtype, *, compile_):
    from sfmkern import ops, reference

    c, d = flow.shape
    labels = torch.cat([torch.arange(c, device=device),
                        torch.randint(0, c, (n - c,), generator=gen, device=device)]).sort().values
    features = torch.randn(n, d, generator=gen, device=device).to(dtype).requires_grad_(True)
    one_way = n * d * features.element_size() + 8 * n + 4 * c * d
    shape = f"N={n} D={d} C={c} {str(dtype).removeprefix('torch.')}"
    providers = [("torch eager", lambda x: reference.sfm_loss(x, labels, flow))]
    if compile_:
        compiled = torch.compile(reference_loss, dynamic=False)
        providers.append(("torch.compile", lambda x: compiled(x, labels, flow)))
    providers.append((sfmkern_label(features), lambda x: ops.sfm_loss(x, labels, flow, sorted_labels=True)))
    for provider, fn in providers:
        with torch.no_grad():
            record("sfm_loss fwd", shape, provider, timer(lambda fn=fn: fn(features)), one_way)
        loss = fn(features)
        record("sfm_loss bwd", shape, provider,
               timer(lambda loss=loss: torch.autograd.grad(loss, features, retain_graph=True)), one_way)
        record("sfm_loss fwd+bwd", shape, provider,
               timer(lambda fn=fn: torch.autograd.grad(fn(features), features)), 2 * one_way)


# ------------------------------------------------------------------------------------------------ main
def shapes(device: torch.device, quick: bool):
    """(class_sums [(N, D)], sfm_loss [N], dtypes, C) for the device and preset."""
    if device.type == "cuda":
        if quick:
            return [(1_281_167, 768)], [1000, 10_000], (torch.float32, torch.bfloat16), 1000
        return ([(128_000, 768), (1_281_167, 768), (1_281_167, 1024)], [1000, 2000, 10_000],
                (torch.float32, torch.bfloat16), 1000)
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if quick or interpreted:
        return [(4_000, 768)], [200], (torch.float32,), 100
    return [(64_000, 768)], [1000, 4000], (torch.float32, torch.bfloat16), 1000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the goal shapes only (GPU) / one small shape (CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=0.5, help="CPU: seconds of repeats per measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("SFMKERN_VALIDATE", "0")  # time the hot path: no value checks, no host syncs

    from sfmkern import ops

    timer = make_timer(device, args.min_time)
    bandwidth = copy_bandwidth(timer, device)
    load_before = common.load_average()
    t_start = time.perf_counter()
    dev_name = common.device_name(str(device))
    print(f"benchmarks/kernels.py on {dev_name}"
          + (f": copy bandwidth {bandwidth:.0f} GB/s" if bandwidth else ": CPU, ms and ratios only"), flush=True)
    rows = []  # (bench, shape, provider, ms, nbytes)

    def record(bench, shape, provider, ms, nbytes):
        rows.append((bench, shape, provider, ms, nbytes))
        gbs = nbytes / (ms * 1e-3) / 1e9
        extra = f" {gbs:7.0f} GB/s ({100 * gbs / bandwidth:.0f}% copy)" if bandwidth else ""
        print(f"{bench:17s} {shape:30s} {provider:38s} {ms:9.4f} ms{extra}", flush=True)

    gen = torch.Generator(device=device).manual_seed(0)
    if not args.no_compile:  # one graph per shape, dtype and grad mode: allow them all (torch 2.11 and 2.14 names)
        from torch._dynamo import config as dynamo_config

        name = next(n for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n))
        setattr(dynamo_config, name, 64)
    sums_shapes, loss_ns, dtypes, c = shapes(device, args.quick)
    for n, d in sums_shapes:
        bench_class_sums(record, timer, device, gen, n, d, c, compile_=not args.no_compile)
    flow = ops.real_flow(torch.randn(c, 768, generator=gen, device=device))
    for n in loss_ns:
        for dtype in dtypes:
            bench_sfm_loss(record, timer, device, gen, n, flow, dtype, compile_=not args.no_compile)
    elapsed = time.perf_counter() - t_start

    eager = {(b, s): ms for b, s, p, ms, _ in rows if p == "torch eager"}
    table = []
    for bench, shape, provider, ms, nbytes in rows:
        gbs = nbytes / (ms * 1e-3) / 1e9
        gb_cells = [f"{gbs:.0f}", f"{100 * gbs / bandwidth:.0f}%"] if bandwidth else ["–", "–"]
        table.append([bench, shape, provider, f"{ms:.4f}", *gb_cells, f"{eager[bench, shape] / ms:.2f}×"])
    goals = goal_lines(rows, bandwidth)
    print("\n".join(goals))
    text = (f"{common.stamp('kernels: benchmarks/kernels.py' + (' --quick' if args.quick else ''))}\n\n"
            f"Device: {common.describe_machine(str(device))}{driver_note(device)}; {common.versions()}. "
            + (f"do_bench medians; GB/s from the explicit byte counts in the script's docstring against the measured "
               f"copy bandwidth ({bandwidth:.0f} GB/s, read + write of 1 GiB). " if bandwidth else
               f"CPU: median of repeats, ms and ratios only ({torch.get_num_threads()} thread(s)). ")
            + f"Load average before: {load_before}; run took {elapsed:.0f} s.\n\n"
            + HEADER + "".join("| " + " | ".join(row) + " |\n" for row in table) + "\n" + "\n".join(goals) + "\n")
    if not args.no_append:
        print(f"appended {len(rows)} rows to {common.append_results(text)}")
    return 0


def driver_note(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return f", driver {out[0]}, CUDA {torch.version.cuda}" if out else f", CUDA {torch.version.cuda}"
    except (OSError, subprocess.SubprocessError):
        return f", CUDA {torch.version.cuda}"


def goal_lines(rows, bandwidth) -> list[str]:
    """The two goals of the kernels issue, from the rows of this run (or why they could not be judged)."""
    lines = []
    sums = [(p, nbytes / (ms * 1e-3) / 1e9) for b, s, p, ms, nbytes in rows
            if b == "class_sums" and s.startswith("N=1281167 D=768") and "sfmkern" in p]
    if bandwidth and sums:
        best_p, best = max(sums, key=lambda t: t[1])
        share = best / bandwidth
        lines.append(f"- class_sums at N=1281167, D=768, C=1000: {best:.0f} GB/s = **{share:.0%}** of copy bandwidth "
                     f"({best_p}; goal ≥ 80%: {'PASS' if share >= 0.8 else 'FAIL'})")
    else:
        lines.append("- class_sums ≥ 80% of copy bandwidth: not judged (needs a CUDA device and N=1281167, D=768)")
    for shape in sorted({s for b, s, p, ms, n in rows if b == "sfm_loss fwd+bwd"}):
        ms = {p: t for b, s, p, t, n in rows if b == "sfm_loss fwd+bwd" and s == shape}
        mine = next((t for p, t in ms.items() if p.startswith("sfmkern")), None)
        if mine is None:
            continue
        ratio = ms["torch eager"] / mine
        compiled = f", torch.compile / sfmkern {ms['torch.compile'] / mine:.2f}×" if "torch.compile" in ms else ""
        goal = shape.startswith("N=1000 ") and shape.split()[2] == "C=1000"
        verdict = f" (goal ≥ 2×: {'PASS' if ratio >= 2 else 'FAIL'})" if goal and bandwidth else ""
        lines.append(f"- sfm_loss fwd+bwd {shape}: torch eager / sfmkern **{ratio:.2f}×**{compiled}{verdict}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
