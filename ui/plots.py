"""The memory timeline as a matplotlib figure (no pyplot: no global figure state, thread-safe)."""

from __future__ import annotations

from matplotlib.figure import Figure

COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def memory_figure(summary: dict) -> Figure:
    """Memory over time with the phases shaded, the measured peak and the plan's predicted peak."""
    timeline = summary.get("timeline") or []
    phases = summary.get("phases") or []
    plan = summary.get("plan", {})
    cpu = plan.get("device") == "cpu"
    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    colors: dict[str, str] = {}
    for ph in phases:
        base = ph["name"].rstrip("0123456789")
        first = base not in colors
        color = colors.setdefault(base, COLORS[len(colors) % len(COLORS)])
        ax.axvspan(
            ph["start_s"],
            ph["start_s"] + max(ph["seconds"], 1e-3),
            color=color,
            alpha=0.35,
            lw=0,
            label=base if first else None,
        )
    if timeline:
        ts = [t[0] for t in timeline]
        gb = [t[1] for t in timeline]
        ax.plot(ts, gb, color="#222222", lw=1.6, marker="o", ms=3, label="process RSS" if cpu else "reserved")
    peak = summary.get("measured_peak_reserved_gb")
    if peak:
        ax.axhline(peak, color="#c44e52", lw=1, ls=":", label=f"measured peak {peak:.2f} GB")
    predicted = plan.get("predicted_peak_gb")
    if predicted:
        ax.axhline(predicted, color="#4c72b0", lw=1, ls="--", label=f"predicted peak {predicted:.2f} GB")
    budget = plan.get("budget_gb")
    if budget and not cpu:
        ax.axhline(budget, color="#8c8c8c", lw=1, ls="-.", label=f"tier budget {budget:.1f} GB")
    ax.set_xlabel("seconds")
    ax.set_ylabel("host RAM (GB)" if cpu else "GPU memory (GB)")
    top = max([t[1] for t in timeline] + [peak or 0, predicted or 0, (budget or 0) if not cpu else 0, 0.1])
    ax.set_ylim(0, top * 1.15)
    ax.grid(alpha=0.3)
    # below the axes, not beside them: a phone-width plot keeps its full width for the data
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return fig
