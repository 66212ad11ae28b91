"""``pykvmm trace plot``: the one picture of a run a bug report needs: a lane per vCPU coloured
by plane over time, a tick at every plane switch, an arrow for every IPI from the sender's
lane to where the target took it. matplotlib is optional: ``pip install 'pykvmm[plot]'``."""

from __future__ import annotations

from ..vmm import events as ev
from . import trace as tr
from .export import ipi_flows
from .query import TraceFilter

# one fill colour per plane (RGB), distinct from the black switch ticks and red IPI arrows
PLANE_RGB = ((0x4C, 0x72, 0xB0), (0xDD, 0x84, 0x52), (0x55, 0xA8, 0x68), (0x81, 0x72, 0xB3),
             (0x93, 0x78, 0x60), (0xDA, 0x8B, 0xC3), (0x8C, 0x8C, 0x8C), (0xCC, 0xB9, 0x74))
IPI_RGB = (0xC4, 0x1E, 0x3A)
_MAX_ARROW_HEADS = 400          # beyond this, IPIs are drawn as lines (arrow patches are slow)


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("trace plot needs matplotlib: pip install 'pykvmm[plot]'") from None
    return plt


def _rgb(c) -> tuple[float, float, float]:
    return tuple(x / 255 for x in c)


def plot_timeline(events: list[dict], path: str, flt: TraceFilter | None = None, title: str | None = None,
                  width: float = 12.0) -> dict:
    """Draw the trace to ``path`` (PNG, SVG or PDF by its suffix); returns what was drawn:
    {"vcpus": [...], "planes": [...], "switches": n, "ipis": n}."""
    plt = _pyplot()
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Patch

    flt = flt or TraceFilter()
    label = tr.plane_label(events)
    lanes = flt.clip(tr.residency(events))
    vcpus = sorted(lanes)
    row = {v: k for k, v in enumerate(vcpus)}
    planes = sorted({s["plane"] for segs in lanes.values() for s in segs})
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.7 * max(len(vcpus), 1)))
    for v, segs in lanes.items():
        for p in planes:
            bars = [(s["start"], max(s["end"] - s["start"], 1e-3)) for s in segs if s["plane"] == p]
            if bars:
                ax.broken_barh(bars, (row[v] - 0.35, 0.7), facecolors=_rgb(PLANE_RGB[p % len(PLANE_RGB)]),
                               edgecolor="none", antialiased=False)
    switches = [e for e in events if e.get("kind") == ev.SWITCH and e.get("vcpu") in row and flt.in_window(e["ts"])]
    if switches:
        ax.vlines([e["ts"] for e in switches], [row[e["vcpu"]] - 0.45 for e in switches],
                  [row[e["vcpu"]] + 0.45 for e in switches], colors="black", linewidths=0.6)
    flows = [(s, d) for s, d in ipi_flows(events) if s.get("vcpu") in row and d["vcpu"] in row
             and flt.in_window(s["ts"]) and (flt.planes is None or d["plane"] in flt.planes)]
    colour = _rgb(IPI_RGB)
    if len(flows) <= _MAX_ARROW_HEADS:
        for s, d in flows:
            ax.annotate("", xy=(d["ts"], row[d["vcpu"]]), xytext=(s["ts"], row[s["vcpu"]]),
                        arrowprops={"arrowstyle": "->", "color": colour, "lw": 0.8})
    else:
        ax.add_collection(LineCollection([((s["ts"], row[s["vcpu"]]), (d["ts"], row[d["vcpu"]])) for s, d in flows],
                                         colors=[colour], linewidths=0.5))
    ax.set_yticks(range(len(vcpus)), [f"vCPU {v}" for v in vcpus])
    ax.set_ylim(-0.6, len(vcpus) - 0.4)
    ax.invert_yaxis()
    ax.set_xlabel("time since the run started (µs)")
    ax.set_title(title or "pykvmm trace")
    handles = [Patch(color=_rgb(PLANE_RGB[p % len(PLANE_RGB)]), label=f"{label}{p}".strip()) for p in planes]
    handles += [plt.Line2D([], [], color="black", lw=0.8, label=f"plane switch ({len(switches)})"),
                plt.Line2D([], [], color=colour, lw=0.8, label=f"IPI ({len(flows)})")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return {"vcpus": vcpus, "planes": planes, "switches": len(switches), "ipis": len(flows)}
