"""The evaluation's figures (matplotlib, Agg backend, PNG): PESQ vs bitrate, spectrograms, codebook usage, training
and checkpoint curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers / CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..codecs.quantizers import uniform_usage  # noqa: E402

STYLE = {"model": ("tab:blue", "o"), "opus": ("tab:orange", "s"), "codec2": ("tab:green", "^")}
LABEL = {"model": "ours", "opus": "Opus", "codec2": "Codec2"}


def plot_pesq_vs_kbps(payload: dict, path: str | Path) -> Path | None:
    """Mean PESQ (with 95% CI bars) of each system against its nominal bitrate; one line per codec."""
    rows = [r for r in payload["systems"] if r["kind"] in STYLE and r["pesq"]["mean"] is not None]
    if not rows:
        return None
    rate = payload["scoring"]["sample_rate"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind, (color, marker) in STYLE.items():
        pts = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["kbps"])
        if not pts:
            continue
        x = np.array([r["kbps"] for r in pts])
        y = np.array([r["pesq"]["mean"] for r in pts])
        err = np.array([[y[i] - r["pesq"]["ci95"][0], r["pesq"]["ci95"][1] - y[i]] if r["pesq"]["ci95"] else [0, 0]
                        for i, r in enumerate(pts)]).T
        label = LABEL[kind] + (f" ({payload['model']['name']})" if kind == "model" else "")
        ax.errorbar(x, y, yerr=err, color=color, marker=marker, markersize=7, capsize=3, linewidth=1.5, label=label)
        for xi, yi, r in zip(x, y, pts):
            ax.annotate(r["system"].replace("ours ", ""), (xi, yi), textcoords="offset points", xytext=(6, 6),
                        fontsize=8, color=color)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["kbps"] for r in rows})
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("bitrate (kbit/s; ours = sum log2(cardinality) x frame rate)")
    ax.set_ylabel(f"PESQ-{'WB' if rate == 16000 else 'NB'} (MOS-LQO)")
    ax.set_ylim(1.0, 4.7)
    ax.grid(True, alpha=0.3)
    n = payload["data"]["n_scored"]
    title = f"PESQ vs bitrate, {n} clips"
    if not payload["model"].get("trained"):
        title += " — UNTRAINED model (random weights)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _choose_panels(example: dict) -> list[tuple[str, np.ndarray]]:
    panels = [("original", example["reference"])]
    decoded = example["decoded"]
    ours = [k for k in decoded if k.startswith("ours")]
    if ours:  # the highest-bitrate K: what the model is named for
        panels.append((ours[-1], decoded[ours[-1]]))
    opus = [k for k in decoded if k.startswith("Opus")]
    if opus:  # the lowest Opus rate: the one the quality target compares against
        panels.append((opus[0], decoded[opus[0]]))
    return panels


def plot_spectrograms(example: dict | None, path: str | Path,
                      panels: list[tuple[str, np.ndarray]] | None = None) -> Path | None:
    """Original / ours / Opus log-magnitude spectrograms of one clip on one colour scale (`panels`: other
    (title, signal) rows instead, e.g. several models on the same clip)."""
    if not example:
        return None
    panels = panels or _choose_panels(example)
    sr = example["sample_rate"]
    n_fft, hop = 512 if sr >= 16000 else 256, 128 if sr >= 16000 else 64
    window = np.hanning(n_fft)
    specs = []
    for _, sig in panels:
        sig = np.asarray(sig, dtype=np.float64)
        if len(sig) < n_fft:
            sig = np.pad(sig, (0, n_fft - len(sig)))
        frames = np.lib.stride_tricks.sliding_window_view(sig, n_fft)[::hop] * window
        specs.append(20 * np.log10(np.abs(np.fft.rfft(frames, axis=-1)).T + 1e-6))
    top = max(s.max() for s in specs)
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.2 * len(panels)), dpi=80, sharex=True, squeeze=False)
    for ax, (name, _), spec in zip(axes[:, 0], panels, specs):
        duration = spec.shape[1] * hop / sr
        im = ax.imshow(spec, origin="lower", aspect="auto", cmap="magma", vmin=top - 80, vmax=top,
                       extent=(0, duration, 0, sr / 2000))
        ax.set_ylabel("kHz")
        ax.set_title(name, fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("time (s)")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="dB", shrink=0.9)
    fig.suptitle(f"clip {example['clip']}", fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_codebook_usage(payload: dict, counts: dict[str, list[list[float]]], path: str | Path) -> Path | None:
    """Left: share of entries used per codebook (95% target line). Right: sorted entry frequencies."""
    if not counts:
        return None
    key = list(counts)[-1]  # the largest K evaluated: it holds every codebook
    rows = payload["codebooks"][key]
    hist = [np.asarray(c, dtype=np.float64) for c in counts[key]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, gridspec_kw={"width_ratios": [1, 1.6]})
    idx = np.arange(len(rows))
    usage = [100 * r["usage"] for r in rows]
    bars = ax1.bar(idx, usage, color="tab:blue")
    for b, r in zip(bars, rows):  # inside the bar, clear of the target line
        inside = b.get_height() > 25
        ax1.text(b.get_x() + b.get_width() / 2, b.get_height() - 2 if inside else b.get_height() + 2,
                 f"{100 * r['usage']:.0f}%\nH={r['entropy_bits']:.1f} b", ha="center",
                 va="top" if inside else "bottom", fontsize=7, color="white" if inside else "black")
    ax1.axhline(95, color="tab:red", linestyle="--", linewidth=1, label="target 95%")
    ax1.set_xticks(idx)
    ax1.set_xticklabels([str(r["codebook"]) for r in rows])
    ax1.set_xlabel("codebook")
    ax1.set_ylabel("entries used (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(loc="upper right", fontsize=8)
    for i, h in enumerate(hist):
        total = h.sum()
        if total <= 0:
            continue
        freq = np.sort(h[h > 0])[::-1] / total  # unused entries have no place on a log axis: the curve stops
        ax2.plot(np.arange(1, len(freq) + 1), freq, label=f"codebook {i} ({len(freq)} used)", linewidth=1.2)
    card = max(len(h) for h in hist)
    ax2.axhline(1.0 / card, color="gray", linestyle=":", linewidth=1, label="uniform")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(1, card)
    ax2.set_xlabel(f"entry rank (of {card})")
    ax2.set_ylabel("frequency")
    ax2.legend(fontsize=7, ncol=2, loc="best")
    ax2.grid(True, alpha=0.3)
    title = f"codebook usage, {key}, {int(sum(h.sum() for h in hist) / max(len(hist), 1)):,} frames"
    if not payload["model"].get("trained"):
        title += " — UNTRAINED model"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_usage_by_frames(curves: dict[str, list[dict]], entries: int, path: str | Path) -> Path | None:
    """Share of a codebook's entries used against frames per entry, one line per labelled set (rows with
    `frames` and `usage`), with what uniform codes would reach and the 95% target."""
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    longest = 0.0
    for label, rows in curves.items():
        per_entry = [r["frames"] / entries for r in rows]
        longest = max(longest, per_entry[-1])
        ax.plot(per_entry, [100 * r["usage"] for r in rows], marker="o", markersize=3, label=label)
    grid = np.geomspace(min(0.25, longest), max(longest, 0.25), 100)
    ax.plot(grid, 100 * uniform_usage(grid * entries, entries), color="gray", linestyle=":", label="uniform codes")
    ax.axhline(95, color="tab:red", linestyle="--", linewidth=1, label="target 95%")
    ax.set_xscale("log")
    # Plain numbers at the doublings the curves are sampled at (log-axis minor labels overlap on a short range).
    ax.xaxis.set_major_locator(ticker.FixedLocator([2.0 ** e for e in range(-4, 8)]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel(f"frames per entry (entries: {entries})")
    ax.set_ylabel("entries used (%)")
    ax.set_ylim(0, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("codebook usage against the number of frames encoded", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


VALIDATION_CURVE_KEYS = ("valid/pesq", "valid/stoi", "valid/usage_mean")


def read_validation_curve(metrics_csv: str | Path, step_offset: int = 0) -> dict[str, dict[float, float]]:
    """Validation PESQ-WB / STOI / codebook usage by generator step (+ `step_offset`) from a run's CSV log,
    or from a curve file that `write_validation_curve` wrote: {key: {step: value}}."""
    import csv

    # step -> value; a resumed run logs again the steps after its checkpoint, and its rows (later) win
    series: dict[str, dict[float, float]] = {key: {} for key in VALIDATION_CURVE_KEYS}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            # Validation rows carry no gen_step; their `step` is Lightning's 0-based index of the last batch
            # (one batch = one G step, whatever the D steps), so the generator steps done are step + 1.
            # Curve files (write_validation_curve) have a gen_step column.
            if row.get("gen_step"):
                step = float(row["gen_step"])
            elif row.get("step"):
                step = float(row["step"]) + 1
            else:
                continue
            for key, points in series.items():
                if row.get(key):
                    points[step + step_offset] = float(row[key])
    return series


def write_validation_curve(series: dict[str, dict[float, float]], path: str | Path) -> Path:
    """Save a curve as CSV (gen_step + one column per key; blank where a step lacks a value), atomically."""
    import csv

    path = Path(path)
    steps = sorted({step for points in series.values() for step in points})
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["gen_step", *series])
        for step in steps:
            out.writerow([f"{step:g}", *(f"{points[step]:.4f}" if step in points else "" for points in series.values())])
    tmp.replace(path)
    return path


def _save(fig, path: str | Path, dpi: int) -> Path:
    """Lay out, write (making the folder) and close a figure; the curves' files, which may go to a new folder."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_training_curve(series: dict[str, dict[float, float]], path: str | Path,
                        marks: dict[float, str] | None = None) -> Path | None:
    """Plot a validation curve (`read_validation_curve`); `marks`: {step: label} drawn as dashed lines."""
    if not any(series.values()):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    titles = {"valid/pesq": "PESQ-WB (validation)", "valid/stoi": "STOI (validation)",
              "valid/usage_mean": "codebook usage (validation, mean)"}
    for ax, (key, points) in zip(axes, series.items()):
        if points:
            steps, values = zip(*sorted(points.items()))
            ax.plot(steps, values, marker="o", color="tab:blue")
        for step, label in (marks or {}).items():
            ax.axvline(step, color="tab:gray", linestyle="--", linewidth=1)
            # written along the line, inside the axes: a horizontal label runs into the next panel
            ax.annotate(label, (step, 1), xycoords=("data", "axes fraction"), xytext=(-3, -4),
                        textcoords="offset points", fontsize=7, color="tab:gray", rotation=90, ha="right", va="top")
        ax.set_title(titles[key])
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))  # step numbers are wide: fewer ticks, no overlap
        ax.set_xlabel("generator steps")
        ax.grid(alpha=0.3)
    return _save(fig, path, dpi=110)


def plot_checkpoint_comparison(speakers: list[str], stats: dict[str, dict[int, list[dict]]], ylabel: str,
                               path: str | Path) -> Path:
    """scripts/compare_runs.py's first table drawn: one panel per speaker and one for the mean over speakers, each
    arm's difference from the reference against its step with the 95% intervals. `stats`: {arm: {step: [summary per
    speaker]}} (`runner.summarize`: mean, ci95). Whether an arm still climbs or has levelled off is read here at a
    glance; in the table it takes a column of numbers per speaker."""
    panels = [*speakers, "mean over speakers"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.4), sharey=True, squeeze=False)
    for i, (ax, title) in enumerate(zip(axes[0], panels)):
        for name, steps in stats.items():
            xs = list(steps)
            if i < len(speakers):
                cells = [steps[k][i] for k in xs]
                err = [0.0 if c["ci95"] is None else (c["ci95"][1] - c["ci95"][0]) / 2 for c in cells]
                ax.errorbar(xs, [c["mean"] for c in cells], yerr=err, marker="o", markersize=3, capsize=2, label=name)
            else:  # no interval here: the mean over speakers averages clips that differ by speaker
                ax.plot(xs, [np.mean([c["mean"] for c in steps[k]]) for k in xs], marker="o", markersize=3, label=name)
        ax.axhline(0.0, color="tab:gray", linewidth=1)
        ax.set_title(title, fontsize=9)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(5))
        ax.set_xlabel("generator steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path, dpi=100)
