"""Issue 15, item 8: a 1.1B-parameter Llama-style ONNX (tools/make_llama_onnx.py) pruned in <= 60 s whole process
and <= 1.5x its size in peak RAM, `--ratio 0.3 --fast` with verification on a short sequence.

    python tools/bench_scale.py make --layers 4            export the proxy (cached under .bench/scale/)
    python tools/bench_scale.py run --layers 4 [--repeat 2] the CLI as a user runs it, under /usr/bin/time -v:
                                                            wall time, peak RSS, per-pass timings (the report)
    python tools/bench_scale.py profile --layers 4          in-process: peak RSS during each pass (sampled)

--layers 22 is TinyLlama's full depth (4.4 GB of weights). Extra CLI flags go after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench" / "scale"
CLI_ARGS = ["--ratio", "0.3", "--fast", "--input-shape", "input_ids=1,16"]


def model_path(layers: int) -> Path:
    return CACHE / f"llama-L{layers}.onnx"


def make(layers: int) -> Path:
    path = model_path(layers)
    if not path.exists():
        sys.path.insert(0, str(ROOT))
        from tools.make_llama_onnx import export
        print(export(path, layers=layers))
    return path


def model_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_cli(path: Path, extra: list[str]) -> dict:
    """One whole-process run of spa-prune under /usr/bin/time -v."""
    out = Path("/tmp") / f"bench-scale-{os.getpid()}.onnx"
    report = out.with_suffix(".json")
    cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "spa-prune"), str(path), str(out), *CLI_ARGS,
           *extra, "--report", str(report), "--quiet"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    stats = {}
    for line in proc.stderr.splitlines():
        if "Maximum resident set size" in line:
            stats["peak_rss_gb"] = int(line.split(":")[-1]) * 1024 / 1e9
        elif "User time (seconds)" in line:
            stats["user_s"] = float(line.split(":")[-1])
        elif "System time (seconds)" in line:
            stats["sys_s"] = float(line.split(":")[-1])
    result = {"model": str(path), "model_gb": model_bytes(path) / 1e9, "exit": proc.returncode, "wall_s": wall,
              **stats, "load_avg": os.getloadavg()}
    result["rss_over_size"] = result.get("peak_rss_gb", 0) / result["model_gb"]
    if report.exists():
        r = json.loads(report.read_text())
        result.update(timings_s=r["timings_s"], macs_ratio=r["macs"]["ratio"], params_ratio=r["params"]["ratio"],
                      groups=r["groups"], verification=r["verification"].get("status"))
        report.unlink()
    else:
        result["stderr"] = proc.stderr.strip().splitlines()[:3]
    for leftover in (out, out.with_name(out.name + ".data")):
        if leftover.exists():
            leftover.unlink()
    return result


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def profile(path: Path, extra: list[str]) -> dict:
    """Peak RSS (sampled every 10 ms) while each pass runs, in this process."""
    sys.path.insert(0, str(ROOT))
    from spa import driver

    peaks: dict[str, float] = {}
    current = ["start"]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = rss_bytes() / 1e9
            peaks[current[0]] = max(peaks.get(current[0], 0.0), rss)
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t = time.perf_counter()
    result = driver.prune(str(path), f"/tmp/bench-scale-profile-{os.getpid()}.onnx", ratio=0.3, importance="l2",
                          allocation="uniform", reconstruct=False, input_shapes={"input_ids": (1, 16)},
                          progress=lambda step: current.__setitem__(0, step), memory_limit_gb=64,
                          exclude=[e for i, e in enumerate(extra) if i and extra[i - 1] == "--exclude"] or None)
    stop.set()
    thread.join()
    out = Path(f"/tmp/bench-scale-profile-{os.getpid()}.onnx")
    for leftover in (out, out.with_name(out.name + ".data")):
        if leftover.exists():
            leftover.unlink()
    return {"wall_s": time.perf_counter() - t, "model_gb": model_bytes(path) / 1e9,
            "peak_rss_gb_by_step": {k: round(v, 3) for k, v in peaks.items()},
            "timings_s": result.report["timings_s"]}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["make", "run", "profile"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args(argv)
    path = make(a.layers)
    if a.what == "run":
        for _ in range(a.repeat):
            print(json.dumps(run_cli(path, extra)), flush=True)
    elif a.what == "profile":
        print(json.dumps(profile(path, extra)), flush=True)


if __name__ == "__main__":
    main()
