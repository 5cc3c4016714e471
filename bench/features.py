"""Benchmark: batched log-mel (seld.features.log_mel) against the per-file librosa recipe.

Same synthetic 5-s stereo clips for every path, warmed up, best of --repeats (the machine is
shared, so the ratio to the librosa reference measured in the same run is the robust figure).
Also measures the machine's float64 FFT and float32 matmul peaks and states which fraction of them
the batched path reaches. Run: .venv/bin/python bench/features.py [--clips 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import time

import numpy as np
import torch

N_SAMPLES = 120_000
N_FRAMES, N_FFT, N_BINS, N_MELS = 251, 1024, 513, 64
# Work per clip (2 channels): real FFTs at the conventional 2.5 N log2 N flops, and the mel matmul.
FFT_FLOP_PER_CLIP = 2 * N_FRAMES * 2.5 * N_FFT * np.log2(N_FFT)
MM_FLOP_PER_CLIP = 2 * N_FRAMES * 2 * N_BINS * N_MELS


def make_clips(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2, 120000) float32: noise and tones at levels spread over 60 dB."""
    rng = np.random.default_rng(seed)
    t = np.arange(N_SAMPLES) / 24_000
    x = rng.standard_normal((n, 2, N_SAMPLES)) * 0.1
    x += np.sin(2 * np.pi * rng.uniform(50, 8000, (n, 2, 1)) * t)
    x *= 10 ** (-rng.uniform(0, 3, (n, 1, 1)))
    return x.astype(np.float32)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (filterbank, window, FFT plans, allocator)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def fft_peak_gflops(device: str, repeats: int) -> float:
    """Sustained float64 rfft rate on frames of 1024 (GFLOP/s at 2.5 N log2 N)."""
    rows = 8192 if device == "cpu" else 262_144
    x = torch.randn(rows, N_FFT, dtype=torch.float64, device=device)

    def run():
        torch.fft.rfft(x, dim=-1)
        if device != "cpu":
            torch.cuda.synchronize()
    return rows * 2.5 * N_FFT * np.log2(N_FFT) / best_time(run, repeats) / 1e9


def matmul_peak_gflops(device: str, repeats: int) -> float:
    """float32 GEMM rate of a large square product (GFLOP/s)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)

    def run():
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
    return 2 * n**3 / best_time(run, repeats) / 1e9


def _worker(seed: int, n: int, repeats: int) -> float:
    torch.set_num_threads(1)
    from seld.features import log_mel

    x = make_clips(n, seed)
    return best_time(lambda: log_mel(x), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()

    from seld.features import log_mel, log_mel_librosa

    n_cpu = os.cpu_count() or 1
    x = make_clips(args.clips)
    res: dict = {"clips": args.clips, "cpu_count": n_cpu, "machine": platform.processor() or platform.machine(),
                 "torch": torch.__version__}
    n_ref = min(args.clips, 48)
    t_ref = best_time(lambda: [log_mel_librosa(c) for c in x[:n_ref]], args.repeats)
    res["librosa_per_file_1core"] = n_ref / t_ref

    for threads in sorted({1, n_cpu}):
        torch.set_num_threads(threads)
        res[f"batched_{threads}thread"] = args.clips / best_time(lambda: log_mel(x), args.repeats)
    torch.set_num_threads(n_cpu)
    if n_cpu > 1:
        ctx = multiprocessing.get_context("spawn")
        per = args.clips // n_cpu
        with cf.ProcessPoolExecutor(n_cpu, mp_context=ctx) as pool:
            list(pool.map(_worker, range(n_cpu), [2] * n_cpu, [1] * n_cpu))  # start + import
            times = list(pool.map(_worker, range(n_cpu), [per] * n_cpu, [args.repeats] * n_cpu))
        res[f"batched_{n_cpu}proc_x_1thread"] = per * n_cpu / max(times)

    # Peaks on one core (single-threaded), so the full-machine figure assumes linear scaling.
    torch.set_num_threads(1)
    fft_peak = fft_peak_gflops("cpu", args.repeats)
    mm_peak = matmul_peak_gflops("cpu", args.repeats)
    torch.set_num_threads(n_cpu)
    best_cpu = max(v for k, v in res.items() if k.startswith("batched_torch"))
    ideal_s = FFT_FLOP_PER_CLIP / (fft_peak * 1e9) + MM_FLOP_PER_CLIP / (mm_peak * 1e9)
    res.update({
        "cpu_fft64_peak_gflops_1core": fft_peak, "cpu_sgemm_peak_gflops_1core": mm_peak,
        "cpu_best_clips_per_s": best_cpu, "speedup_vs_librosa": best_cpu / res["librosa_per_file_1core"],
        "cpu_fraction_of_peak_1core": ideal_s * res["batched_1thread"],
        "cpu_fraction_of_peak_machine": ideal_s / n_cpu * best_cpu,
    })

    if torch.cuda.is_available():
        xg = torch.from_numpy(make_clips(1024, 1)).cuda()

        def gpu_run():
            log_mel(xg)
            torch.cuda.synchronize()
        gpu = 1024 / best_time(gpu_run, args.repeats)
        g_fft, g_mm = fft_peak_gflops("cuda", args.repeats), matmul_peak_gflops("cuda", args.repeats)
        ideal_g = FFT_FLOP_PER_CLIP / (g_fft * 1e9) + MM_FLOP_PER_CLIP / (g_mm * 1e9)
        res.update({"gpu": torch.cuda.get_device_name(), "gpu_clips_per_s": gpu, "gpu_fft64_peak_gflops": g_fft,
                    "gpu_sgemm_peak_gflops": g_mm, "gpu_fraction_of_peak": ideal_g * gpu})
        errs = [float(np.abs(log_mel(xg[i:i + 1]).cpu().numpy()[0] - log_mel_librosa(xg[i].cpu().numpy())).max())
                for i in range(8)]
        res["gpu_max_err_db_vs_librosa"] = max(errs)

    for k, v in res.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
