"""Draw a training run's curves as PNG files, from its metrics.jsonl.

    python -m nanobumble.plot checkpoints/pretrain/tiny_base [--smoothing 0.6]

writes output_dir/plots/<figure>.png, one line printed per file. A figure is
written only when the run logged its keys:

    loss.png        train/loss (the total optimised), raw and smoothed; a DPO run's parts
                    beside it: train/preference_loss and train/nll_loss (its sft_weight term)
    lr.png          learning rate              grad_norm.png   gradient norm
    val.png         val/loss, val/bpb (DPO: val/preference_loss, val/nll_loss), a panel each
    throughput.png  tokens/s (and MFU)
    rewards.png     DPO rewards, chosen and rejected
    margins.png     DPO reward margins         accuracies.png  DPO reward accuracies
    logps.png       log-probs of the chosen and rejected answers (logits.png: mean logits)
    drift.png       DPO: each answer's mean log-prob per token minus the reference's
    eval.png        eval/<task>/acc and exact_match per task (eval_bpb.png: eval/<task>/bpb)

Smoothing (--smoothing W, 0 <= W < 1; 0: raw lines only) is TensorBoard's: an
exponential moving average started at 0 and divided by 1 - W^t after t points,
so the first points are not pulled toward 0 nor held at the first value.

Keys are matched by their ending, so "rewards/chosen" and "val/rewards/chosen"
land in the same figure as two lines. A damaged line (a run killed mid-write
leaves a torn last line) is skipped and counted; a missing key only means one
figure fewer. Figures left in plots/ by an earlier run in the same output_dir
are removed when this run has no data for them, so plots/ always shows this run.

The training scripts call plot_run(output_dir) when they finish; it never
raises (a finished run must not fail for its pictures): a problem, such as
matplotlib not being installed, is printed as one line. matplotlib is imported
only here, only when drawing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nanobumble.base.errors import UserError
from nanobumble.base.files import atomic_path
from nanobumble.store.run_files import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SMOOTHING = 0.6  # TensorBoard's default weight: the smoothed loss averages over roughly the last 2.5 points
# The y label of each loss: the same words wherever it is drawn (training or validation).
LOSS_LABELS = {"loss": "loss (total, as optimised)", "preference_loss": "preference_loss (DPO family)",
               "nll_loss": "nll_loss (chosen answers, per token)"}

Match = Callable[[list[str]], tuple[str, str] | None]  # key split on "/" -> (panel y label, line label)


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file name, without .png
    title: str
    match: Match  # which keys this figure draws, and in which panel
    smooth: bool = False  # also draw an EMA of every line
    ylim: tuple[float, float] | None = None


def _ending(ylabel: str, *names: str) -> Match:
    """Keys whose last part is one of names, with any prefix: "train/lr", "lr"."""
    return lambda parts: (ylabel, "/".join(parts)) if parts[-1] in names else None


def _pair(ylabel: str, group: str, *names: str) -> Match:
    """Keys ending in group/<name>, with any prefix: "rewards/chosen", "val/rewards/chosen"."""
    def match(parts: list[str]) -> tuple[str, str] | None:
        if len(parts) >= 2 and parts[-2] == group and parts[-1] in names:
            return ylabel, "/".join(parts)
        return None
    return match


def _train_loss(parts: list[str]) -> tuple[str, str] | None:
    if parts[-1] in LOSS_LABELS and (parts[:-1] == ["train"] or len(parts) == 1):
        return LOSS_LABELS[parts[-1]], "/".join(parts)
    return None


def _val(parts: list[str]) -> tuple[str, str] | None:
    # val/loss and val/bpb have different units: a panel each (so has each part of a DPO loss)
    return (LOSS_LABELS.get(parts[1], parts[1]), "/".join(parts)) if parts[0] == "val" and len(parts) == 2 else None


def _throughput(parts: list[str]) -> tuple[str, str] | None:
    ylabel = {"tokens_per_sec": "tokens/s", "mfu": "MFU (fraction of peak FLOP/s)"}.get(parts[-1])
    return (ylabel, "/".join(parts)) if ylabel else None


def _eval(ylabel: str, *metrics: str) -> Match:
    """eval/<task>/<metric>: a line per task (and metric)."""
    def match(parts: list[str]) -> tuple[str, str] | None:
        if parts[0] == "eval" and len(parts) == 3 and parts[2] in metrics:
            return ylabel, parts[1] if len(metrics) == 1 else f"{parts[1]} {parts[2]}"
        return None
    return match


FIGURES = [
    FigureSpec("loss", "Training loss", _train_loss, smooth=True),
    FigureSpec("lr", "Learning rate", _ending("learning rate", "lr", "learning_rate")),
    FigureSpec("grad_norm", "Gradient norm (before clipping)", _ending("gradient norm", "grad_norm")),
    FigureSpec("val", "Validation", _val),
    FigureSpec("throughput", "Throughput", _throughput),
    FigureSpec("rewards", "DPO rewards", _pair("reward", "rewards", "chosen", "rejected")),
    FigureSpec("margins", "DPO reward margins (chosen - rejected)", _pair("margin", "rewards", "margins")),
    FigureSpec("accuracies", "DPO reward accuracies (chosen > rejected)",
               _pair("accuracy", "rewards", "accuracies"), ylim=(-0.05, 1.05)),
    FigureSpec("logps", "Log-probabilities of the answers", _pair("log-prob", "logps", "chosen", "rejected")),
    FigureSpec("logits", "Mean logits of the answers", _pair("mean logit", "logits", "chosen", "rejected")),
    FigureSpec("drift", "Drift from the reference (mean log-prob per answer token)",
               _pair("nats per token", "drift", "chosen", "rejected")),
    FigureSpec("eval", "Evaluation accuracy", _eval("accuracy", "acc", "exact_match"), ylim=(-0.05, 1.05)),
    FigureSpec("eval_bpb", "Evaluation bits per byte", _eval("bits per byte", "bpb")),
]


def collect_series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """key -> (steps, values), sorted by step, keys in the order first logged.
    Validation is logged on lines of its own, so a step can span several records;
    if a step repeats for a key, its last value wins. Non-numbers are ignored."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            by_key.setdefault(key, {})[record["step"]] = float(value)
    return {key: (sorted(points), [points[step] for step in sorted(points)]) for key, points in by_key.items()}


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average from 0, debiased by
    dividing by 1 - weight^t after t finite values (an average of the points so far,
    the recent ones weighing more). A non-finite value is drawn as it is and not
    averaged in."""
    smoothed, average, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(value)
            continue
        average = weight * average + (1 - weight) * value
        count += 1
        smoothed.append(average / (1 - weight ** count))
    return smoothed


def build_figures(records: list[dict], smoothing: float = SMOOTHING) -> dict[str, Figure]:
    """name -> matplotlib Figure, for every figure in FIGURES with data; not saved.
    smoothing: the weight of the smoothed lines (0: none drawn)."""
    from matplotlib.figure import Figure  # a bare Figure needs no display: drawn by Agg when saved

    series = collect_series(records)
    figures = {}
    for spec in FIGURES:
        panels: dict[str, list[tuple[str, str]]] = {}  # y label -> [(line label, key)]
        for key in series:
            found = spec.match(key.split("/"))
            if found is not None:
                panels.setdefault(found[0], []).append((found[1], key))
        if not panels:
            continue
        figure = Figure(figsize=(6 * len(panels), 4), layout="constrained")
        figure.suptitle(spec.title)
        for ax, (ylabel, lines) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
            for label, key in lines:
                steps, values = series[key]
                # markers make sparse series (validation, a short run, one point) visible
                marker = "o" if len(steps) < 20 else None
                if spec.smooth and smoothing > 0:
                    ax.plot(steps, values, label=label, alpha=0.35, marker=marker, markersize=3)
                    ax.plot(steps, smooth(values, smoothing), label=f"{label} (smoothed {smoothing:g})")
                else:
                    ax.plot(steps, values, label=label, marker=marker, markersize=3)
            ax.set_xlabel("step")
            ax.xaxis.get_major_locator().set_params(integer=True)  # no "step 1.5" on short runs
            ax.set_ylabel(ylabel)
            if spec.ylim:
                ax.set_ylim(*spec.ylim)
            ax.grid(alpha=0.3)
            ax.legend()
        figures[spec.name] = figure
    return figures


def write_plots(output_dir: str, smoothing: float = SMOOTHING) -> dict[str, str]:
    """Draw output_dir/metrics.jsonl into output_dir/plots/; returns name -> path
    of the files written. Raises UserError for a missing directory, file or matplotlib."""
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isdir(output_dir):
        raise UserError(f"{output_dir}: no such directory")
    if not os.path.isfile(metrics_path):
        raise UserError(f"{output_dir}: has no metrics.jsonl (a training run writes it there as it logs)")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("matplotlib is not installed; to draw plots: pip install matplotlib") from None

    records, skipped = read_metrics(metrics_path)
    if skipped:
        print(f"{metrics_path}: skipped {skipped} damaged line{'s' if skipped > 1 else ''}")
    figures = build_figures(records, smoothing)
    if not figures:
        print(f"{metrics_path}: nothing to plot")

    plots_dir = os.path.join(output_dir, "plots")
    written = {}
    for spec in FIGURES:
        path = os.path.join(plots_dir, f"{spec.name}.png")
        if spec.name in figures:
            os.makedirs(plots_dir, exist_ok=True)
            with atomic_path(path) as tmp:  # a reader never sees half a picture
                figures[spec.name].savefig(tmp, format="png", dpi=100)
            written[spec.name] = path
            print(f"wrote {path}")
        elif os.path.exists(path):
            os.remove(path)  # drawn from an earlier run's metrics: it would mislead
    return written


def plot_run(output_dir: str) -> dict[str, str]:
    """write_plots for the end of a training run (call it on one rank only): never
    raises, a problem is printed as one warning line and gives {}."""
    try:
        return write_plots(output_dir)
    except Exception as e:  # the run itself has finished and is saved; its pictures are a bonus
        reason = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        print(f"warning: no plots: {reason}")
        return {}
