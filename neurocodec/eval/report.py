"""Turn an evaluation (`runner.EvalResult`) into a JSON file and a Markdown report (with its plots)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..codecs.quantizers import uniform_usage
from .runner import CI_NOTE, EvalResult, summarize

TABLE_METRICS = ("pesq", "stoi", "mel_distance", "si_sdr", "pesq_nb")


def _fmt(stat: dict, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    if stat.get("ci95"):
        half = (stat["ci95"][1] - stat["ci95"][0]) / 2
        text += f" ± {half:.{digits}f}"
    return text


def _kbps(row: dict) -> str:
    if row["kbps"] is None or not math.isfinite(row["kbps"]):
        return "—"
    text = f"{row['kbps']:.2f}"
    measured = row.get("measured_kbps")
    if row["kind"] != "model" and measured is not None and abs(measured - row["kbps"]) > 0.005:
        text += f" ({measured:.2f})"
    return text


def results_table(payload: dict) -> str:
    """The Markdown table: one row per system, mean ± 95% CI half-width per metric."""
    rate = payload["scoring"]["sample_rate"]
    pesq_label = "PESQ-WB" if rate == 16000 else "PESQ-NB"
    head = ["system", "kbps", pesq_label, "STOI", "mel dist ↓", "SI-SDR dB", "PESQ-NB @8k", "clips"]
    metrics = list(TABLE_METRICS)
    if "visqol" in payload["scoring"]:  # scored only when asked (`--visqol`)
        head.insert(-1, "ViSQOL")
        metrics.append("visqol")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in payload["systems"]:
        digits = {"si_sdr": 1, "stoi": 3}
        cells = [row["system"], _kbps(row)] + [_fmt(row.get(m), digits.get(m, 2)) for m in metrics]
        cells.append(str(row["n_clips"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def codebook_table(payload: dict) -> str:
    lines = ["| K | codebook | entries | used | perplexity | entropy (bits / max) |", "|---|---|---|---|---|---|"]
    for k, rows in payload["codebooks"].items():
        for r in rows:
            lines.append(f"| {k} | {r['codebook']} | {r['cardinality']} | {100 * r['usage']:.1f}% | "
                         f"{r['perplexity']:.1f} | {r['entropy_bits']:.2f} / {r['max_bits']:.0f} |")
    return "\n".join(lines)


def paired_difference(payload: dict, system: str, other: str, metric: str = "pesq") -> dict:
    """`system` minus `other` clip by clip, over the clips both scored: `summarize` of the differences. Both
    rows score the same clips, so clip difficulty cancels: this interval is usually far narrower than the rows' own."""
    diffs = []
    for clip in payload.get("clips", []):
        scores = clip.get("systems", {})
        a, b = (scores.get(system) or {}).get(metric), (scores.get(other) or {}).get(metric)
        if a is not None and b is not None:
            diffs.append(a - b)
    return summarize(diffs)


def target_lines(payload: dict) -> list[str]:
    """DESIGN.md's quality and codebook-usage targets, checked on this evaluation (when it has the rows): one
    Markdown bullet each."""
    rows = {r["system"]: r for r in payload["systems"]}
    ours = [r for r in payload["systems"] if r["kind"] == "model" and r["pesq"]["mean"] is not None]
    opus6 = rows.get("Opus 6 kbps")
    lines = []
    if ours and opus6 and opus6["pesq"]["mean"] is not None:
        best = min(ours, key=lambda r: abs(r["kbps"] - 2.0))  # the target is stated at 2 kbps
        met = best["pesq"]["mean"] >= opus6["pesq"]["mean"]
        diff = paired_difference(payload, best["system"], opus6["system"])
        paired = ""
        if diff["ci95"] is not None:
            half = (diff["ci95"][1] - diff["ci95"][0]) / 2
            paired = f" (paired over the {diff['n']} clips: {diff['mean']:+.3f} ± {half:.3f}, 95% CI)"
        lines.append(f"- target *PESQ-WB at 2 kbps >= Opus 6 kbps*: {best['system']} ({best['kbps']:.2f} kbps) "
                     f"{best['pesq']['mean']:.2f} vs {opus6['pesq']['mean']:.2f}{paired} -> "
                     f"**{'met' if met else 'not met'}**")
    for k, cbs in payload.get("codebooks", {}).items():
        low = min(cbs, key=lambda c: c["usage"])
        context = ""
        if low.get("codes_seen"):  # usage grows with the set: say how many codes it had per entry
            seen, entries = low["codes_seen"], low["cardinality"]
            context = (f" over {seen:,} codes, {seen / entries:.1f} per entry (uniform codes would use "
                       f"{uniform_usage(seen, entries):.0%})")
        lines.append(f"- target *>= 95% of codebook entries used* ({k}): smallest usage {100 * low['usage']:.1f}%"
                     f"{context} -> **{'met' if low['usage'] >= 0.95 else 'not met'}**")
    return lines


def write_json(result: EvalResult | dict, path: str | Path) -> Path:
    payload = result.to_json() if isinstance(result, EvalResult) else result
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_default) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def markdown(payload: dict, figures: dict[str, str] | None = None, title: str | None = None,
             command: str | None = None) -> str:
    model, data, scoring = payload["model"], payload["data"], payload["scoring"]
    trained = model.get("trained")
    title = title or f"Quality of {model['name']}"
    out = [f"# {title}", ""]
    if not trained:
        out += ["> **UNTRAINED MODEL.** These figures are for random weights initialised from the config "
                f"(`{model['spec']}`), not a trained checkpoint: they prove the evaluation pipeline, "
                "not the codec's quality.", ""]
    out += [
        f"- model: `{model['spec']}` ({model['family']}, {model['num_codebooks']} codebooks of "
        f"{', '.join(map(str, sorted(set(model['cardinality']))))} entries, {model['frame_rate']:g} frames/s, "
        f"{model['parameters']:,} parameters)",
    ]
    if model.get("checkpoint_sha256"):
        out.append(f"- checkpoint sha256: `{model['checkpoint_sha256'][:16]}…`")
        meta = model.get("checkpoint_metadata") or {}
        if meta:
            out.append("- checkpoint metadata: " + ", ".join(f"{k}={v}" for k, v in sorted(meta.items())))
    split = f", split `{data['split']}`" if data.get("split") else ""
    out += [
        f"- data: `{data['source']}`{split}: {data['n_scored']} of {data['n_clips']} clips scored, "
        f"{data['seconds']:.1f} s of audio",
        f"- scoring at {scoring['sample_rate']} Hz, PESQ {scoring['pesq']}; alignment: {scoring['alignment']}",
        f"- our kbps: {scoring['bitrate']} (nominal, no entropy coding); baselines: nominal "
        "(measured in brackets when it differs)",
        f"- Opus: {scoring['opus']}",
        f"- Codec2: {scoring['codec2']}",
        f"- each cell: mean ± half-width of the {CI_NOTE}",
    ]
    if command:
        out += [f"- command: `{command}`"]
    out += ["", "## Results", "", results_table(payload), ""]
    targets = target_lines(payload)
    if targets:
        out += ["Targets (DESIGN.md):", "", *targets, ""]
    start = model.get("stream_start_overshoot_db") or {}
    if start:
        out += ["Stream start: the loudest codec frame of the first 200 ms of output, when a stream opens on "
                "white noise at " +
                ", ".join(f"{level} dBFS" for level in start) + ", is " +
                ", ".join(f"{v:+.1f} dB" for v in start.values()) + " louder than the input (0: no start "
                "transient; above ~+6 dB it is a click).", ""]
    entropy = model.get("entropy_kbps") or {}
    if entropy:
        out += ["Entropy of the codes over the set (the rate an entropy coder could reach): " +
                ", ".join(f"{k}: {v:.2f} kbps" for k, v in entropy.items()) + ".", ""]
    out += ["## Codebook usage", "", codebook_table(payload), ""]
    if figures:
        out += ["## Figures", ""]
        for caption, name in figures.items():
            out += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    errors = payload.get("errors") or []
    out += ["## Errors", ""]
    if errors:
        for e in errors:
            who = f" ({e['system']})" if e.get("system") else ""
            out.append(f"- `{e['clip']}`{who}: {e['error']}")
    else:
        out.append("None: every clip was scored by every system.")
    out.append("")
    return "\n".join(out)


def write_report(result: EvalResult, out_dir: str | Path, title: str | None = None,
                 command: str | None = None, plots: bool = True) -> dict[str, Path]:
    """report.md + results.json + PNG figures in `out_dir`; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = result.to_json()
    paths = {"json": write_json(payload, out_dir / "results.json")}
    figures: dict[str, str] = {}
    if plots:
        from . import plots as P

        p = P.plot_pesq_vs_kbps(payload, out_dir / "pesq_vs_kbps.png")
        if p:
            figures["PESQ against bitrate (mean and 95% CI)"] = p.name
            paths["pesq_vs_kbps"] = p
        p = P.plot_spectrograms(result.example, out_dir / "spectrograms.png")
        if p:
            figures[f"Spectrograms of clip `{result.example['clip']}`"] = p.name
            paths["spectrograms"] = p
        p = P.plot_codebook_usage(payload, result.usage_counts, out_dir / "codebook_usage.png")
        if p:
            figures["Codebook usage over the set"] = p.name
            paths["codebook_usage"] = p
    md = out_dir / "report.md"
    md.write_text(markdown(payload, figures, title=title, command=command), encoding="utf-8")
    paths["markdown"] = md
    return paths
