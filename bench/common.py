"""Shared helpers of the benchmarks: paths, machine description, timing, subprocess runs, charts.

Conventions used by every benchmark module (``bench/<name>.py``):

* ``run(quick: bool, ctx: Context) -> dict`` measures and returns JSON-ready results;
* ``section(results: dict, ctx: Context) -> str`` renders them as Markdown (and writes the
  module's PNG chart into ``ctx.chart_dir``).

Timing: :func:`interleaved` runs the compared functions in turn (A B C A B C ...) so that a
burst of load from other processes hits every contender alike, and every figure is the
median over the repeats. Ratios are taken within the same run, never across runs.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def shared_dir() -> Path:
    """The shared data folder: ``$FEWSHOT_SHARED`` or ``../shared`` beside the repository."""
    return Path(os.environ.get("FEWSHOT_SHARED", ROOT.parent / "shared")).resolve()


def grocery_root() -> Path:
    return shared_dir() / "data" / "grocery-store-dataset"


def omniglot_root() -> Path:
    return shared_dir() / "data" / "omniglot" / "images_background_small1"


@dataclass
class Context:
    """What every benchmark gets: output folders, thread setting, earlier results of this run."""

    out_dir: Path
    work_dir: Path
    quick: bool = False
    threads: int | None = None
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def chart_dir(self) -> Path:
        d = self.out_dir / "bench"
        d.mkdir(parents=True, exist_ok=True)
        return d


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (and FAISS's OpenMP threads) when ``threads`` is given."""
    import torch

    if threads:
        torch.set_num_threads(int(threads))
        try:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        except ImportError:  # pragma: no cover
            pass


def machine() -> dict[str, Any]:
    """CPU, memory, load and library versions, recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cpus": usable_cpus(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(), "platform": platform.platform(terse=True),
        "torch": torch.__version__, "numpy": np.__version__,
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        pass
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        pass
    for mod in ("faiss", "pytorch_metric_learning", "sklearn", "PIL"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", "?")
        except ImportError:
            info[mod] = None
    try:
        import faiss

        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    try:
        import fewshot

        info["fewshot"] = fewshot.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


# --------------------------------------------------------------------------- timing
def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of every call of every function, run in turn: ``A B C, B C A, C A B, ...``.

    ``warmup`` untimed rounds come first (allocators, lazy initialisation, caches).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for i in range(len(names)):  # rotate the order each round: no contender is always first
            name = names[(i + r) % len(names)]
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]`` of two interleaved series."""
    return [a / b for a, b in zip(num, den) if b > 0]


def loglog_slope(sizes, times) -> float:
    """Least-squares slope of log(time) against log(size): cost grows as size ** slope."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(times, float))
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(x[ok], y[ok], 1)[0])


# --------------------------------------------------------------------------- memory and children
def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover
        return 0


def peak_rss() -> int:
    """Peak resident set size of this process image so far, in bytes.

    Linux ``VmHWM`` (the high-water mark of this address space). Not ``ru_maxrss``: that one
    survives ``fork`` + ``exec``, so a child would report its parent's peak when larger.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["FEWSHOT_BENCH_THREADS"] = str(threads)
    return env


def run_child(module: str, args: list[str], timeout: float, threads: int | None = None) -> dict[str, Any]:
    """Run ``python -m bench.<module> ARGS`` and return the JSON object on its last stdout line.

    The child measures its own time and peak memory (:func:`peak_rss`), so that each
    contender's memory is its own. On a timeout the result is ``{"timed_out": True, ...}``;
    on a crash ``{"error": ...}``.
    """
    cmd = [sys.executable, "-m", f"bench.{module}", *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "timeout_s": timeout, "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def child_threads() -> None:
    """In a child: apply the thread setting the parent passed down."""
    t = os.environ.get("FEWSHOT_BENCH_THREADS")
    set_threads(int(t) if t else None)


# --------------------------------------------------------------------------- synthetic embeddings
def clustered_embeddings(n: int, dim: int = 1280, per_class: int = 5, noise: float = 3.0,
                         seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 ``[n, dim]`` embeddings in ``n // per_class`` classes of ``per_class`` each.

    Each class has a Gaussian centre; its items are the centre plus Gaussian noise of standard
    deviation ``noise`` (3.0 gives mid-range retrieval scores at 1,280 dimensions, so that a
    disagreement between implementations would show). Rows are in random order. Generated in
    float32 chunks: no float64 copy of the whole array.
    """
    rng = np.random.default_rng(seed)
    n_classes = n // per_class
    labels = rng.permutation(np.repeat(np.arange(n_classes, dtype=np.int64), per_class))
    centres = rng.standard_normal((n_classes, dim), dtype=np.float32)
    x = np.empty((len(labels), dim), dtype=np.float32)
    step = 8192
    for i in range(0, len(labels), step):
        block = rng.standard_normal((min(step, len(labels) - i), dim), dtype=np.float32)
        block *= noise
        block += centres[labels[i:i + step]]
        x[i:i + step] = block
    return x, labels


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------- formatting
def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return f"{float(x):.{digits}f}"


def fmt_s(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


# --------------------------------------------------------------------------- charts
def pyplot():
    """matplotlib's pyplot on the Agg backend with small, readable defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100, "savefig.dpi": 100,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def save_chart(fig, path: Path) -> str:
    """Save a figure as a small PNG; returns the file name for the Markdown link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def emit(result: dict[str, Any]) -> None:
    """In a child: print the result as one JSON line (the parent reads the last one)."""
    print(json.dumps(result, default=_json_default), flush=True)
