"""Helpers shared by the benches. Standard library only at import time: the TRL 1.9 virtual environment of
ppo_vs_trl.py imports this file too, and the orchestrating process stays light (no torch), so a child's
peak memory is its own.

Protocol: a bench runs each contender as a CHILD process (`python bench/<x>.py --worker NAME --config JSON
--out FILE`), alternating contenders, and reads back the JSON the child wrote. Peak memory is the child's own
high-water RSS (VmHWM of /proc/self/status, read by the child at the end), cross-checked with the ru_maxrss that
os.wait4 reports for exactly that child.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
CACHE = BENCH_DIR / ".cache"  # models built from config, run directories, logs (git-ignored)

BENCH_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRL_EXPERIMENTAL_SILENCE": "1",
    "PYTHONWARNINGS": "ignore",
    "TQDM_DISABLE": "1",
}


def bench_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BENCH_ENV)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def setup_worker(threads: int = 1) -> None:
    """First thing a worker does (before importing torch)."""
    os.environ.update(BENCH_ENV)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """High-water resident set size of this process since exec, MiB."""
    return _status_kb("VmHWM") / 1024


# ------------------------------------------------------------------------------------------------ children


def run_child(script: str, worker: str, config: dict, *, python: str | None = None, threads: int = 1,
              timeout: float = 1800, tag: str = "") -> dict:  # fmt: skip
    """Run `python bench/<script> --worker <worker>` with `config`; return the JSON it wrote, plus `wall_s` and
    `wait4_maxrss_mb` (the kernel's peak RSS for that child). Its output goes to bench/.cache/logs/."""
    logs = CACHE / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stamp = f"{Path(script).stem}-{worker}{'-' + tag if tag else ''}-{int(time.time() * 1000)}"
    out, log = logs / f"{stamp}.json", logs / f"{stamp}.log"
    cmd = [python or sys.executable, str(BENCH_DIR / script), "--worker", worker, "--config", json.dumps(config),
           "--out", str(out)]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=bench_env(threads), cwd=str(REPO))
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not out.exists():
        tail = log.read_text()[-4000:]
        raise RuntimeError(f"{worker} worker failed (exit {code}); log {log}:\n{tail}")
    result = json.loads(out.read_text())
    result["wall_s"] = wall
    result["wait4_maxrss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    result["log"] = str(log.relative_to(REPO))
    return result


def worker_main(workers: dict, argv: list[str] | None = None) -> bool:
    """If argv asks for a worker, run it (writing its JSON) and return True."""
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" not in argv:
        return False
    name = argv[argv.index("--worker") + 1]
    config = json.loads(argv[argv.index("--config") + 1])
    out = Path(argv[argv.index("--out") + 1])
    result = workers[name](config)
    result.setdefault("peak_rss_mb", peak_rss_mb())
    out.write_text(json.dumps(result, indent=1, default=float))
    return True


# ------------------------------------------------------------------------------------------------ reporting


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd: int = 3) -> str:
    if isinstance(x, float):
        if x != x:
            return "-"
        return f"{x:.{nd}f}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table (what the benches print and docs/performance.md holds)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def machine() -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "1")),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def versions(python: str | None = None) -> dict:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        "for p in ('torch', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'bitsandbytes'):\n"
        "    try: out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    res = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, env=bench_env())
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    return path


def trl_lora_config(cfg: dict):
    """The LoRA every bench's TRL side uses (alignlab's recipes: r 16, alpha 32, no dropout, all linear layers), or
    None for full fine-tuning (`cfg["peft"] == "none"`)."""
    if cfg["peft"] == "none":
        return None
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def report(bench: str, name: str, setting: str, headers: list, rows: list, targets: dict, payload: dict) -> None:
    """Print the setting, the table and each target's verdict; write bench/results/<name>.json."""
    main_table = table(headers, rows)
    lines = [f"- {k}: {v['value']:.3f} (target {v['target']}): {'met' if v['met'] else 'NOT met'}"
             + (f"; amortised incl. precompute {v['amortised']:.3f}" if "amortised" in v else "")
             for k, v in targets.items()]  # fmt: skip
    print("\n" + setting + "\n\n" + main_table + "\n\n" + "\n".join(lines))
    path = write_result(name, {
        "bench": bench, "command": command_line(), "setting": setting, "machine": machine(), "versions": versions(),
        **payload, "targets": targets, "table": main_table,
    })  # fmt: skip
    print(f"wrote {path}")


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO))] + sys.argv[1:])


# ------------------------------------------------------------------------------------------------ trainer hooks


class RssPoller:
    """Polls this process's RSS every `interval` s in a thread; `peak` is the largest value seen (MiB)."""

    def __init__(self, interval: float = 0.01):
        import threading

        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def peak_memory(device: str) -> dict:
    """This process's peak RSS (MiB), and on CUDA the peak of torch's allocator (`cuda_peak_mb`)."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        import torch

        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def hook_trainer_steps(cuda: bool = False, poll_rss: bool = False) -> dict:
    """Patch transformers' Trainer (the base class, so any stage's subclass is covered) to record, per optimizer
    step, its start (training_step called, batch collated) and end (on_step_end, after the optimizer), its tokens
    and batch shape; with `poll_rss`, the peak RSS while train() runs. Returns the dict that fills up."""
    import torch
    from transformers import Trainer, TrainerCallback

    rec: dict = {"steps": [], "train_peak_rss_mb": 0.0}
    training_step, train = Trainer.training_step, Trainer.train

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed_training_step(self, model, inputs, *args, **kwargs):
        sync()
        t0 = time.perf_counter()
        loss = training_step(self, model, inputs, *args, **kwargs)
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        rec["steps"].append({"t0": t0, "tokens": real, "shape": list(inputs["input_ids"].shape)})
        return loss

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            rec["steps"][-1]["t1"] = time.perf_counter()

    def train_with_hooks(self, *args, **kwargs):
        self.add_callback(StepEnd())
        if not poll_rss:
            return train(self, *args, **kwargs)
        with RssPoller() as poller:
            out = train(self, *args, **kwargs)
        rec["train_peak_rss_mb"] = max(rec["train_peak_rss_mb"], poller.peak)
        return out

    Trainer.training_step, Trainer.train = timed_training_step, train_with_hooks
    return rec


def step_seconds(rec: dict, warmup: int) -> list[float]:
    return [s["t1"] - s["t0"] for s in rec["steps"][warmup:] if "t1" in s]
