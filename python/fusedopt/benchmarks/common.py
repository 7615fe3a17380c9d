"""Benchmark plumbing: timers, a measured copy-bandwidth roofline, an environment stamp and result
writers. Imports and runs on CPU-only machines; CUDA paths are touched only for device='cuda'."""
from __future__ import annotations

import datetime
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fusedopt
import fusedopt._ext



@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _summarize(samples_ms: list[float]) -> Timing:
    p20, _, _, p80 = statistics.quantiles(samples_ms, n=5, method="inclusive")
    return Timing(statistics.median(samples_ms), p20, p80, len(samples_ms))


def _pick_reps(one_ms: float, target_s: float, min_reps: int, max_reps: int) -> int:
    # Fast cases get many reps (their medians are the noisiest), slow ones stay within budget.
    return max(min_reps, min(max_reps, int(target_s * 1e3 / max(one_ms, 1e-3))))


def _timed(fn, device: str, warmup: int, target_s: float, min_reps: int, max_reps: int) -> Timing:
    for _ in range(warmup):
        fn()
    one_ms = sample_ms(fn, device, 1)[0]
    return _summarize(sample_ms(fn, device, _pick_reps(one_ms, target_s, min_reps, max_reps)))


def time_cpu(fn, warmup: int = 3, target_s: float = 1.0, min_reps: int = 5, max_reps: int = 200) -> Timing:
    return _timed(fn, "cpu", warmup, target_s, min_reps, max_reps)


_L2_FLUSH_BYTES = 256 << 20
_flush_buf: torch.Tensor | None = None


def _flush_l2() -> None:
    # Larger than any current GPU's L2 (H100: 50 MB), so each rep starts from DRAM as a real
    # training step would (the backward pass has evicted the optimizer's tensors by then).
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    _flush_buf.zero_()


def time_cuda(fn, warmup: int = 5, target_s: float = 1.0, min_reps: int = 10, max_reps: int = 500) -> Timing:
    return _timed(fn, "cuda", warmup, target_s, min_reps, max_reps)


def time_fn(fn, device: str, **kw) -> Timing:
    return time_cuda(fn, **kw) if device == "cuda" else time_cpu(fn, **kw)


def sample_ms(fn, device: str, reps: int) -> list[float]:
    """`reps` timed calls of fn (already warmed up), in ms: perf_counter on the CPU; on CUDA event
    pairs, each after an L2 flush outside the timed window."""
    if device != "cuda":
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return out
    events = []
    for _ in range(reps):
        _flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def summarize(samples_ms: list[float]) -> Timing:
    return _summarize(samples_ms)


class BandwidthProbe:
    """The streaming probe of copy_bandwidth_gbs as something to sample between other timings:
    in-place x.mul_(1.0) and dst.copy_(src) on `nbytes`, counted as 2 x nbytes each."""

    def __init__(self, device: str, nbytes: int | None = None) -> None:
        self.nbytes = nbytes or ((1 << 30) if device == "cuda" else (256 << 20))
        self.device = device
        self.src = torch.ones(self.nbytes // 4, dtype=torch.float32, device=device)
        self.dst = torch.zeros_like(self.src)
        self.copy_ms: list[float] = []
        self.inplace_ms: list[float] = []
        for _ in range(2):  # warm up
            self.dst.copy_(self.src)
            self.dst.mul_(1.0)

    def sample(self, reps: int = 3) -> None:
        self.copy_ms += sample_ms(lambda: self.dst.copy_(self.src), self.device, reps)
        self.inplace_ms += sample_ms(lambda: self.dst.mul_(1.0), self.device, reps)

    def gbs(self) -> float:
        best = min(statistics.median(self.copy_ms), statistics.median(self.inplace_ms))
        return 2 * self.nbytes / (best * 1e-3) / 1e9


class OtherLoad:
    """Cores' worth of CPU time that other processes used while the block ran (Linux /proc/stat;
    None elsewhere). On a shared machine this, not the code, is often why a CPU timing is slow."""

    cores: float | None = None

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        busy_s = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
        own = os.times()
        return time.perf_counter(), busy_s, own.user + own.system

    def __enter__(self) -> "OtherLoad":
        self._start = self._sample()
        return self

    def __exit__(self, *exc) -> None:
        end = self._sample()
        if self._start and end:
            (t0, busy0, own0), (t1, busy1, own1) = self._start, end
            self.cores = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))


def copy_bandwidth_gbs(device: str, target_s: float = 1.0) -> tuple[float, Timing]:
    """Measured memory bandwidth (GB/s, 1e9): the better of two streaming probes, each counted as
    read + write = 2 * nbytes:
      - dst.copy_(src), the device-to-device copy the targets are stated against;
      - x.mul_(1.0), an in-place read-modify-write, which is the optimizer's own access pattern.
    On CPUs a copy into another buffer also pays a read-for-ownership of dst that the 2 * nbytes
    count does not see, so copy_ alone understates what an in-place update can reach; taking the
    better probe keeps "% of measured bandwidth" at or below 100% for an in-place kernel."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)  # touched now so page faults are not timed
    copy = time_fn(lambda: dst.copy_(src), device, min_reps=10, target_s=target_s)
    inplace = time_fn(lambda: dst.mul_(1.0), device, min_reps=10, target_s=target_s)
    best = min(copy, inplace, key=lambda t: t.median_ms)
    return 2 * nbytes / (best.median_ms * 1e-3) / 1e9, best


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Flags that tell the CPU loops' paths apart (and name a machine whose "model name" is generic,
# as VMs report "AMD EPYC" for Zen 3 and Zen 5 alike).
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512vbmi", "avx512_vbmi2", "avx512_bf16", "avx512_fp16",
                 "avx512_vp2intersect", "amx_tile", "amx_bf16")


def _cpu_features() -> dict:
    """The _CPU_FEATURES this CPU has, and its per-core L1d/L2 sizes (None where unknown)."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    caches = {"l1d": None, "l2": None}
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            level, kind, size = (Path(index, f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if (level, kind) == ("1", "Data"):
            caches["l1d"] = size
        elif level == "2":
            caches["l2"] = size
    return {"flags": [x for x in _CPU_FEATURES if x in flags], **caches}


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


PEER_PACKAGES = ("bitsandbytes", "torchao", "lion-pytorch", "deepspeed")


def peer_versions() -> dict[str, str]:
    """Installed version of each optional peer package, or 'missing'."""
    out = {}
    for name in PEER_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def env_stamp(device: str, command: str) -> dict:
    """What a result needs to be reproduced and judged: `command` as the user typed it, versions,
    the binary measured, the machine and its load."""
    stamp = {
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_features": _cpu_features(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fusedopt": fusedopt.__version__,
        "fusedopt_backends": fusedopt.backends(),
        # The extension can be rebuilt without a commit: its hash says which binary was measured.
        "fusedopt_ext_sha256": _file_sha256(fusedopt._ext.lib().__file__),
        # The checkout the command ran in (None outside one, e.g. from an installed wheel).
        "git_sha": _run(["git", "rev-parse", "--short", "HEAD"]),
        # Tracked files that differ from git_sha: the measured code is then not exactly that commit.
        "git_modified": [
            line.strip() for line in (_run(["git", "status", "--porcelain", "--untracked-files=no"]) or "").splitlines()
        ],
        # Other work on a shared machine shows up here; compare before/after to judge noise.
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "peers": peer_versions(),
    }
    if device == "cuda":
        stamp.update(
            gpu=torch.cuda.get_device_name(),
            torch_cuda_runtime=torch.version.cuda,
            fusedopt_cuda_runtime=fusedopt._ext.lib().cuda_runtime_version(),
            cuda_driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        )
    return stamp


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp_markdown(stamp: dict) -> str:
    lines = [f"- command: `{stamp['command']}`"]
    lines += [f"- {k}: {v}" for k, v in stamp.items() if k != "command"]
    return "\n".join(lines)


def write_results(out_dir: Path, name: str, stamp: dict, payload: dict, markdown_body: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dict(
        stamp,
        loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
        # Differs from fusedopt_ext_sha256 when someone rebuilt the extension mid-run: the
        # numbers then belong to the start hash (the binary this process loaded).
        fusedopt_ext_sha256_end=_file_sha256(fusedopt._ext.lib().__file__),
    )
    if stamp["fusedopt_ext_sha256_end"] != stamp["fusedopt_ext_sha256"]:
        print("WARNING: the fusedopt extension file changed during this run", file=sys.stderr)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps({"env": stamp, **payload}, indent=2, default=_jsonable) + "\n")
    md_path.write_text(f"# {name}\n\n{stamp_markdown(stamp)}\n\n{markdown_body}\n")
    return json_path, md_path


def _jsonable(o):
    if isinstance(o, Timing):
        return asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
