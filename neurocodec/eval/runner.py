"""Evaluate a codec on a set of clips, side by side with classic codecs at chosen bitrates.

For every clip and every system (our codec at each requested number of codebooks K, and each baseline)
the clip is coded and decoded, the decoded signal is time-aligned to the reference
(`metrics.align`, +-`max_shift_ms`) and scored: PESQ, STOI, mel distance, SI-SDR, and PESQ-NB at 8 kHz.

Scoring rate: wide-band material (every clip at >= 16 kHz) is scored at 16 kHz with PESQ-WB (P.862.2).
If any clip is narrow-band (< 16 kHz, e.g. 8 kHz telephone audio) the whole set is scored at 8 kHz with
PESQ-NB (P.862), against the clip at its own rate, so that no system is rewarded for a band the source
never had. Every system's output is resampled (torchaudio) to the scoring rate.

Our bitrate is nominal: sum over codebooks of log2(cardinality) x frame rate (no entropy coding). The
entropy of the codes actually used over the whole set is reported next to it (the rate an entropy
coder could reach). Baselines report the bitrate they actually produced.

Summary statistics: the mean over clips and its 95% confidence interval from Student's t distribution
(mean +- t(0.975, n-1) * sd / sqrt(n)); with one clip no interval is given.

A clip that cannot be read, or a system that fails on a clip, is recorded in `errors` and skipped; the
rest of the evaluation goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..audio import load_audio, resample
from ..data.manifest import Utterance, read_manifest
from ..errors import UserError
from .baselines import Baseline
from .metrics import (STREAM_START_LEVELS_DBFS, align, mel_distance, pause_level_db, pesq_score, si_sdr, stoi_score,
                      stream_start_overshoot_db, visqol_score)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".opus")
METRICS = ("pesq", "pesq_nb", "stoi", "mel_distance", "si_sdr", "pause_level_db",
           "visqol")  # visqol only with `--visqol`
BITRATE_NOTE = "bitrate = sum over codebooks of log2(cardinality) x frame rate"
CI_NOTE = "95% CI of the mean: Student t, mean +- t(0.975, n-1) * sd / sqrt(n)"


# ---------------------------------------------------------------------------------------------------
# inputs
def find_clips(data: str | Path, split: str | None = None, max_clips: int | None = None) -> list[Utterance]:
    """Clips of a manifest (.jsonl, optionally one split) or of a folder of audio files (recursive, sorted)."""
    data = Path(data)
    if data.is_dir():
        if split is not None:
            manifest = data / "manifest.jsonl"
            if not manifest.is_file():
                raise UserError(f"--split {split} needs a manifest; {data} has no manifest.jsonl")
            return find_clips(manifest, split, max_clips)
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS)
        clips = [Utterance(id=str(p.relative_to(data).with_suffix("")), path=str(p)) for p in files]
    elif data.is_file():
        clips = read_manifest(data, split)
    else:
        raise UserError(f"--data {data} is neither a folder of audio files nor a manifest")
    if not clips:
        where = f"split {split!r} of {data}" if split else str(data)
        raise UserError(f"no clips to evaluate in {where}")
    return clips[:max_clips] if max_clips else clips


def native_rate(path: str) -> int | None:
    try:
        return int(sf.info(path).samplerate)
    except Exception:  # noqa: BLE001 - unreadable: reported when the clip is loaded
        return None


# ---------------------------------------------------------------------------------------------------
# statistics
def summarize(values: list[float]) -> dict:
    """Mean, sd, n and the 95% t-interval of the mean (None where undefined)."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(vals)
    if n == 0:
        return {"mean": None, "sd": None, "n": 0, "ci95": None}
    mean = float(vals.mean())
    if n < 2:
        return {"mean": mean, "sd": None, "n": 1, "ci95": None}
    from scipy.stats import t

    sd = float(vals.std(ddof=1))
    half = float(t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    return {"mean": mean, "sd": sd, "n": n, "ci95": [mean - half, mean + half]}


# ---------------------------------------------------------------------------------------------------
# systems
@dataclass
class System:
    name: str
    kind: str  # "model" | "opus" | "codec2" | "identity"
    kbps: float  # nominal
    num_codebooks: int | None = None
    baseline: Baseline | None = None
    clip_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    measured_kbps: list[float] = field(default_factory=list)

    def row(self) -> dict:
        row = {"system": self.name, "kind": self.kind, "kbps": self.kbps, "num_codebooks": self.num_codebooks,
               "n_clips": len(self.clip_metrics)}
        measured = [m for m in self.measured_kbps if math.isfinite(m)]
        row["measured_kbps"] = float(np.mean(measured)) if measured else None
        for metric in METRICS + ("lag_ms",):
            row[metric] = summarize([c.get(metric) for c in self.clip_metrics.values()])
        return row


@dataclass
class EvalResult:
    model: dict
    data: dict
    scoring: dict
    systems: list[System]
    codebooks: dict[str, list[dict]]
    usage_counts: dict[str, list[list[float]]]
    clips: list[dict]
    errors: list[dict]
    example: dict | None  # one clip's signals for the spectrogram figure (not in the JSON)

    def to_json(self) -> dict:
        return {
            "model": self.model, "data": self.data, "scoring": self.scoring,
            "systems": [s.row() for s in self.systems],
            "codebooks": self.codebooks, "clips": self.clips, "errors": self.errors,
        }


def score(ref: np.ndarray, deg: np.ndarray, sample_rate: int, max_shift: int,
          visqol: bool = False) -> dict[str, float]:
    """Align `deg` to `ref`, then every metric (PESQ at the scoring rate plus PESQ-NB at 8 kHz; ViSQOL if asked:
    it costs about as much as all the others together)."""
    ref_a, deg_a, lag = align(ref, deg, max_shift)
    out = {
        "pesq": pesq_score(ref_a, deg_a, sample_rate),
        "stoi": stoi_score(ref_a, deg_a, sample_rate),
        "mel_distance": mel_distance(ref_a, deg_a, sample_rate),
        "si_sdr": si_sdr(ref_a, deg_a),
        "pause_level_db": pause_level_db(ref_a, deg_a, sample_rate),
        "lag_ms": 1000.0 * lag / sample_rate,
    }
    if visqol:  # ViSQOL failing on a clip (one under 0.65 s) must not cost the clip its other scores
        try:
            out["visqol"] = visqol_score(ref_a, deg_a, sample_rate)
        except Exception as err:  # noqa: BLE001
            out["visqol"] = None
            out["visqol_error"] = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    if sample_rate == 8000:
        out["pesq_nb"] = out["pesq"]
    else:
        r8 = resample(torch.from_numpy(ref_a).float().unsqueeze(0), sample_rate, 8000)[0].numpy()
        d8 = resample(torch.from_numpy(deg_a).float().unsqueeze(0), sample_rate, 8000)[0].numpy()
        out["pesq_nb"] = pesq_score(r8, d8, 8000)
    return out


def default_num_codebooks(codec) -> list[int]:
    """Every allowed K for a variable-bitrate model (trained with quantizer dropout), else the model's K."""
    config = getattr(getattr(codec, "quantizer", None), "config", None)
    if config is not None and getattr(config, "quantize_dropout", False):
        return list(codec.allowed_num_codebooks())
    return [codec.num_codebooks]


def model_description(codec, spec: str) -> dict:
    info = dict(codec.info())
    info["spec"] = str(spec)
    from ..codecs.checkpoint import DEFAULT_MODEL_PATH, file_sha256, read_metadata
    from ..config import DEFAULT_MODEL

    path = DEFAULT_MODEL_PATH if str(spec) == DEFAULT_MODEL else Path(str(spec))  # `default` is a shipped file
    if path.suffix == ".safetensors" and path.is_file():
        info["checkpoint"] = str(path)
        info["checkpoint_sha256"] = file_sha256(path)
        meta = {k: v for k, v in read_metadata(path).items() if k not in ("config", "format")}
        info["checkpoint_metadata"] = meta
        info["trained"] = True
    else:
        info["trained"] = False
        info["note"] = "UNTRAINED: random weights initialised from the config (no checkpoint)"
    return info


@torch.no_grad()
def evaluate(codec, clips: list[Utterance], num_codebooks: list[int] | None = None,
             baselines: list[Baseline] = (), model_spec: str = "", max_shift_ms: float = 50.0,
             progress: bool = True, data_label: str = "", split: str | None = None,
             example_seconds: float = 6.0, visqol: bool = False) -> EvalResult:
    """Code every clip with every system and score it; see the module docstring for the method."""
    from tqdm import tqdm

    torch.set_grad_enabled(False)
    codec.eval()
    ks = list(num_codebooks or default_num_codebooks(codec))
    for k in ks:
        if k not in codec.allowed_num_codebooks():
            raise UserError(f"--num-codebooks {k}: this model allows {codec.allowed_num_codebooks()}")
    for b in baselines:
        b.check_tools()  # fail before any work when a binary is missing

    original_k = codec.num_codebooks
    systems: list[System] = []
    usage: dict[int, object] = {}
    from ..codecs.quantizers import CodebookUsage

    for k in ks:
        codec.set_num_codebooks(k)
        systems.append(System(f"ours K={k}", "model", codec.bitrate / 1000.0, num_codebooks=k))
        usage[k] = CodebookUsage(codec.cardinality)
    for b in baselines:
        systems.append(System(b.name, b.codec, b.kbps, baseline=b))

    rates = {c.id: native_rate(c.path) for c in clips}
    readable = [r for r in rates.values() if r]
    score_rate = 8000 if readable and min(readable) < 16000 else 16000
    max_shift = int(round(max_shift_ms * score_rate / 1000))

    clip_rows: list[dict] = []
    errors: list[dict] = []
    example = None
    seconds_total = 0.0
    start = time.perf_counter()
    bar = tqdm(clips, desc="eval", unit="clip", disable=not progress, dynamic_ncols=True)
    for clip in bar:
        row = {"id": clip.id, "path": clip.path}
        try:
            ref = load_audio(clip.path, score_rate)[0].numpy()
            wav_model = load_audio(clip.path, codec.sample_rate) if score_rate != codec.sample_rate \
                else torch.from_numpy(ref).unsqueeze(0)
        except UserError as err:
            errors.append({"clip": clip.id, "path": clip.path, "system": None, "error": str(err)})
            row["error"] = str(err)
            clip_rows.append(row)
            continue
        row["duration"] = len(ref) / score_rate
        row["native_sample_rate"] = rates[clip.id]
        row["systems"] = {}
        seconds_total += row["duration"]
        decoded_for_example = {}
        for system in systems:
            try:
                if system.kind == "model":
                    codec.set_num_codebooks(system.num_codebooks)
                    codes = codec.encode(wav_model.unsqueeze(0))
                    out = codec.decode(codes)[0, :, :wav_model.shape[-1]]
                    deg = resample(out, codec.sample_rate, score_rate)[0].numpy()
                    kbps = codec.bitrate / 1000.0
                else:
                    deg, kbps = system.baseline.run(ref, score_rate)
                metrics = score(ref, deg, score_rate, max_shift, visqol=visqol)
            except Exception as err:  # noqa: BLE001 - one failing clip/system must not end the run
                message = f"{type(err).__name__}: {err}" if not isinstance(err, UserError) else str(err)
                errors.append({"clip": clip.id, "path": clip.path, "system": system.name, "error": message})
                continue
            if system.kind == "model":  # usage over the clips that were scored, like every other figure
                usage[system.num_codebooks].update(codes)
            system.clip_metrics[clip.id] = metrics
            system.measured_kbps.append(kbps)
            row["systems"][system.name] = metrics
            decoded_for_example[system.name] = deg
        clip_rows.append(row)
        if example is None and decoded_for_example:
            n = int(example_seconds * score_rate)
            example = {"clip": clip.id, "sample_rate": score_rate, "reference": ref[:n],
                       "decoded": {name: d[:n] for name, d in decoded_for_example.items()}}
        model_rows = [s for s in systems if s.kind == "model" and clip.id in s.clip_metrics]
        if model_rows:
            bar.set_postfix(pesq=f"{model_rows[-1].clip_metrics[clip.id]['pesq']:.2f}", errors=len(errors))
    codec.set_num_codebooks(original_k)

    codebooks: dict[str, list[dict]] = {}
    counts: dict[str, list[list[float]]] = {}
    for k, acc in usage.items():
        stats = acc.compute()
        rows = []
        for i, card in enumerate(acc.cardinalities):
            perplexity = float(stats[f"codebook{i}/perplexity"])
            rows.append({"codebook": i, "cardinality": card, "usage": float(stats[f"codebook{i}/usage"]),
                         "dead": float(stats[f"codebook{i}/dead"]), "perplexity": perplexity,
                         "entropy_bits": math.log2(perplexity) if perplexity > 0 else 0.0,
                         "max_bits": math.log2(card), "codes_seen": int(acc.counts[i].sum())})
        codebooks[f"K={k}"] = rows
        counts[f"K={k}"] = [c.tolist() for c in acc.counts]

    model = model_description(codec, model_spec)
    model["bitrate_note"] = BITRATE_NOTE
    model["stream_start_overshoot_db"] = {f"{level:g}": round(stream_start_overshoot_db(codec, level), 2)
                                          for level in STREAM_START_LEVELS_DBFS}
    for k, rows in codebooks.items():
        # entropy-coded rate the codes actually used would need (bits per frame x frame rate)
        model.setdefault("entropy_kbps", {})[k] = sum(r["entropy_bits"] for r in rows) * codec.frame_rate / 1000
    data = {"source": data_label, "split": split, "n_clips": len(clips),
            "n_scored": sum(1 for r in clip_rows if "error" not in r),
            "seconds": round(seconds_total, 3), "wall_seconds": round(time.perf_counter() - start, 2)}
    scoring = {
        "sample_rate": score_rate,
        "pesq": "wide band (P.862.2)" if score_rate == 16000 else "narrow band (P.862)",
        "pesq_nb": "PESQ narrow band on both signals resampled to 8 kHz",
        "alignment": f"decoded signal shifted by the cross-correlation lag within +-{max_shift_ms:g} ms",
        "codec2": "coded at 8 kHz, resampled back to the scoring rate, scored against the same reference",
        "opus": "opusenc --hard-cbr --bitrate N (exact CBR), opusdec --rate <clip rate>; "
                "measured kbps = Opus payload without Ogg overhead",
        "bitrate": BITRATE_NOTE,
        "ci": CI_NOTE,
    }
    if visqol:
        scoring["visqol"] = ("ViSQOL v3 speech mode, MOS-LQO with the deep-lattice mapper (visqol-python), on the "
                             "aligned pair at 16 kHz")
    return EvalResult(model, data, scoring, systems, codebooks, counts, clip_rows, errors, example)
