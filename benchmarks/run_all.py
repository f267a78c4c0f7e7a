"""Runs the benchmarks one after the other and prints their tables (`make bench`).

    .venv/bin/python -m benchmarks.run_all [--full] [--threads N]

Each benchmark runs in its own process (its own argument parser, memory returned between them). The default is the
quick model benchmarks (DETR at 384x512, RT-DETRv2 at 320x320), so that the whole run takes a few minutes on 2 CPU
cores; `--full` times them at 800x1066 and 640x640 (about 10 minutes more). First it prints what it runs on
(benchmarks/machine.py: CPU, vector capability, peak estimate, threads, load, versions): ratios are only comparable
within one run, and on one kind of CPU.
"""
import argparse
import os
import subprocess
import sys
import time

from benchmarks.machine import describe_machine, format_machine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the model benchmark at 800x1066 (default: --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for every benchmark")
    args = parser.parse_args(argv)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    benchmarks = [
        ["benchmarks.bench_model", *([] if args.full else ["--quick"]), *threads],
        ["benchmarks.bench_rt_detr", *([] if args.full else ["--quick"]), *threads],
        ["benchmarks.bench_image_processing", *threads],
    ]
    print(format_machine(describe_machine(args.threads)), flush=True)
    failed = []
    for module, *module_args in benchmarks:
        print(f"\n== python -m {module} {' '.join(module_args)}", flush=True)
        start = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-m", module, *module_args], env=env)
        print(f"== {module}: {time.perf_counter() - start:.0f} s", flush=True)
        if result.returncode != 0:
            failed.append(module)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
