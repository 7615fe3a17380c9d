"""GB/s against tensor size, one panel per suite, with the measured-bandwidth roofline drawn in
(measured before each case, so it can move along the x axis on a shared machine)."""
from __future__ import annotations

from pathlib import Path


def plot_roofline(suites: dict[str, list[dict]], title: str, path: Path) -> Path | str:
    """Writes a PNG and returns its path, or returns why not (matplotlib is an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install .[bench])"
    suites = {n: rows for n, rows in suites.items() if any("gbs" in r for r in rows)}  # Muon: TFLOP/s, no roofline
    if not suites:
        return "no plot: no bandwidth-bound rows"
    fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], suites.items()):
        single = [r for r in rows if r["n_tensors"] == 1 and "gbs" in r]
        for impl in dict.fromkeys(r["impl"] for r in single):
            pts = sorted((r["numel"], r["gbs"]) for r in single if r["impl"] == impl)
            fused = any(r["is_fusedopt"] for r in single if r["impl"] == impl)
            ax.plot([n for n, _ in pts], [g for _, g in pts], marker="o", label=impl,
                    linewidth=2.5 if fused else 1.2, linestyle="-" if fused else "--")
        # the roofline: the bandwidth measured before each case
        bw = sorted({(r["numel"], r["bandwidth_gbs"]) for r in single})
        ax.plot([n for n, _ in bw], [g for _, g in bw], color="black", linewidth=1, linestyle=":",
                label="measured bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, max([g for _, g in bw] + [r["gbs"] for r in single]) * 1.15)
        ax.set_xlabel("params in one tensor")
        ax.set_ylabel("GB/s (model bytes / step time)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
