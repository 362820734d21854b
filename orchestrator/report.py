"""``raydiff report``: one PNG that shows whether a run is healthy at a glance.

Panels, all from the run's own files: the loss (raw and smoothed), the loss per timestep bin
over training, throughput, learning rate, gradient norm, the fp16 loss scale (with the
overflow-skipped steps), the validation loss, and the newest sample grid. Metrics come from
``RunDir.metrics()`` (one history: each step once, object-storage parts joined).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from orchestrator.storage import RunDir, StorageError, join, write_bytes

if TYPE_CHECKING:
    from orchestrator.config import S3Config

REPORT_FILE = "report.png"
FIG_INCHES, DPI = (15.0, 12.0), 100  # 1500 x 1200 pixels
# Panel name -> (row, first column, columns spanned) on a 3 x 3 grid.
PANELS = {
    "loss": (0, 0, 1), "loss_per_t_bin": (0, 1, 1), "images_per_s": (0, 2, 1),
    "lr": (1, 0, 1), "grad_norm": (1, 1, 1), "loss_scale": (1, 2, 1),
    "val_loss": (2, 0, 1), "samples": (2, 1, 2),
}


@dataclass
class Report:
    png: bytes
    # Each panel's axes in pixels (left, top, right, bottom), image coordinates: for tests and tools.
    boxes: dict[str, tuple[int, int, int, int]]
    # Panels drawn from data (the others hold a line saying why they are empty).
    filled: list[str]


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (no lag at the start)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in metrics:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def render(metrics: list[dict[str, Any]], grid_png: bytes | None, *, title: str, grid_name: str = "",
           row_labels: list[str] | None = None) -> Report:
    """The report figure from metrics records and the newest grid (PNG bytes or None);
    ``row_labels`` (a text model's prompts, one per grid row) are written beside the rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIG_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(3, 3)
    axes = {name: fig.add_subplot(gs[r, c : c + span]) for name, (r, c, span) in PANELS.items()}
    filled: list[str] = []
    train = [r for r in metrics if "loss" in r]  # validation-only records hold val_* keys only

    def line(name: str, key: str, ylabel: str, *, log: bool = False, empty: str) -> None:
        ax = axes[name]
        xs, ys = _series(train if key != "val_loss" else metrics, key)
        if not xs:
            _note(ax, empty)
            return
        ax.plot(xs, ys, color="C0", marker="o" if len(xs) < 30 else None, markersize=3)
        if log and min(ys) > 0 and max(ys) / min(ys) > 10:  # a log axis only where the range needs one
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        filled.append(name)

    # Loss: raw and smoothed (the raw curve of a diffusion loss is noisy: timesteps are random).
    ax = axes["loss"]
    xs, ys = _series(train, "loss")
    if xs:
        ax.plot(xs, ys, color="C0", alpha=0.35, linewidth=1, label="raw")
        ax.plot(xs, smooth(ys, 0.9 if len(ys) > 50 else 0.6), color="C0", linewidth=2, label="smoothed")
        ax.set_yscale("log" if min(ys) > 0 and max(ys) / min(ys) > 10 else "linear")
        ax.legend(fontsize=8)
        filled.append("loss")
    else:
        _note(ax, "no training loss recorded")
    ax.set_title("loss")

    # Loss per timestep bin: low-noise bins (left of the schedule) and high-noise ones move differently.
    ax = axes["loss_per_t_bin"]
    rows = [(r["step"], r["loss_per_t_bin"]) for r in train if isinstance(r.get("loss_per_t_bin"), list)]
    nbins = max((len(b) for _, b in rows), default=0)
    if nbins:
        from matplotlib import colormaps

        cmap = colormaps["viridis"]
        for i in range(nbins):
            pts = [(s, b[i]) for s, b in rows if i < len(b) and isinstance(b[i], (int, float))]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=cmap(i / max(nbins - 1, 1)), linewidth=1,
                        label=f"bin {i}" if i in (0, nbins - 1) else None)
        ax.set_yscale("log")
        ax.legend(fontsize=8, title="t bin (0 = least noise)", title_fontsize=8)
        filled.append("loss_per_t_bin")
    else:
        _note(ax, "no loss per timestep bin recorded")
    ax.set_title("loss per timestep bin")

    line("images_per_s", "images_per_s", "images/s", empty="no throughput recorded")
    axes["images_per_s"].set_title("throughput")
    line("lr", "lr", "learning rate", empty="no learning rate recorded")
    axes["lr"].set_title("learning rate")
    if "lr" in filled:
        axes["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))  # 1e-4 as an offset, not 0.00010
    line("grad_norm", "grad_norm", "norm", log=True, empty="no gradient norm recorded")
    axes["grad_norm"].set_title("gradient norm (before clipping)")

    # Loss scale: only DeepSpeed's fp16 engine and fp16 autocast scale (1.0 is recorded otherwise).
    ax = axes["loss_scale"]
    xs, ys = _series(train, "loss_scale")
    if xs and any(v != 1.0 for v in ys):
        ax.plot(xs, ys, color="C1", label="loss scale")
        ax.set_yscale("log", base=2)
        sx, sy = _series(train, "overflow_skipped_steps")
        if sx:
            twin = ax.twinx()
            twin.plot(sx, sy, color="C3", linestyle="--", label="overflow-skipped steps")
            twin.set_ylabel("skipped steps (cumulative)")
            twin.legend(fontsize=8, loc="lower right")
        ax.legend(fontsize=8, loc="upper left")
        filled.append("loss_scale")
    else:
        _note(ax, "fp32/bf16: no loss scaling")
    ax.set_title("fp16 loss scale")

    line("val_loss", "val_loss", "loss", empty="no validation loss\n(logging.val_every_steps=0)")
    axes["val_loss"].set_title("validation loss (EMA weights)")

    ax = axes["samples"]
    if grid_png is not None:
        img = Image.open(io.BytesIO(grid_png)).convert("RGB")
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        if row_labels:
            pitch = img.height / len(row_labels)
            ax.set_yticks([(r + 0.5) * pitch for r in range(len(row_labels))],
                          [p if len(p) <= 40 else p[:39] + "…" for p in (q or '""' for q in row_labels)], fontsize=8)
        filled.append("samples")
    else:
        _note(ax, "no sample grids yet")
    ax.set_title(f"newest samples ({grid_name})" if grid_name else "newest samples")

    for name, a in axes.items():
        if name not in ("samples",) and name in filled:
            a.set_xlabel("step")
            a.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=13)
    # Fixed margins instead of tight_layout, which measured every label and took half the drawing time.
    fig.subplots_adjust(left=0.06, right=0.95, bottom=0.05, top=0.93, wspace=0.32, hspace=0.3)
    fig.canvas.draw()
    height = fig.bbox.height
    boxes = {}
    for name, a in axes.items():
        x0, y0, x1, y1 = a.get_window_extent().extents  # display units: origin bottom left
        boxes[name] = (int(x0), int(height - y1), int(x1), int(height - y0))
    # The canvas is drawn already: encode its pixels instead of drawing again in savefig.
    buf = io.BytesIO()
    Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]).save(buf, format="PNG")
    return Report(buf.getvalue(), boxes, filled)


def newest_grid(rundir: RunDir) -> tuple[str, bytes] | None:
    """The newest ``samples/step_*.png`` (names hold zero-padded steps, so they sort)."""
    grids = sorted(n for n in rundir.listdir("samples") if n.startswith("step_") and n.endswith(".png"))
    if not grids:
        return None
    return grids[-1], rundir.read_bytes(f"samples/{grids[-1]}")


def _grid_prompts(rundir: RunDir) -> list[str] | None:
    """A text model's grid rows (``SamplingConfig.grid_prompts``) from the run's config."""
    from orchestrator.config import load_config_text

    try:
        cfg = load_config_text(rundir.read_text("config.yaml"))
    except Exception:  # noqa: BLE001 - no (readable) config: the grid is drawn without row labels
        return None
    return cfg.sampling.grid_prompts() if cfg.model.text_conditioned else None


def write_report(run_uri: str, s3: "S3Config | None" = None, out: str | None = None) -> tuple[str, Report]:
    """Render the report of the run at ``run_uri``; write it to ``out`` (default
    ``{run}/report.png``). Returns where it went and the report."""
    rundir = RunDir(run_uri, s3)
    metrics = rundir.metrics()
    if not metrics:
        raise StorageError(f"no metrics.jsonl in {rundir.uri}: is it a raydiff run directory? Fix: give the run "
                           "directory, {run.storage}/{run.name} (e.g. runs/demo)")
    grid = newest_grid(rundir)
    last = metrics[-1]
    title = f"{rundir.uri}: step {last.get('step')}, {last.get('samples_seen', '?')} samples seen"
    report = render(metrics, grid[1] if grid else None, title=title, grid_name=grid[0] if grid else "",
                    row_labels=_grid_prompts(rundir))
    dest = out or join(rundir.uri, REPORT_FILE)
    write_bytes(dest, report.png, s3)
    return dest, report


def report_after_training(run_uri: str, s3: "S3Config | None") -> str | None:
    """``raydiff train``'s closing report; a failure to draw it is reported, not raised: the run
    itself succeeded, and ``raydiff report`` can draw it again."""
    try:
        return write_report(run_uri, s3)[0]
    except Exception as e:  # noqa: BLE001 - see the docstring
        logging.getLogger("raydiff").warning("raydiff: the run report could not be written (%s: %s); "
                                             "retry with `raydiff report %s`", type(e).__name__, e, run_uri)
        return None
