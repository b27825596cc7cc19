"""Synthetic speech from espeak-ng beside a real corpus (`neurocodec data espeak`).

Issue 23 asks for espeak-ng "only where it measurably helps": formant synthesis is not real speech, but it costs
nothing, speaks every language of the corpus and reaches pitches (espeak-ng's `+m1..+m8`, `+f1..+f5` and Klatt
variants) that few of the real training voices have. This module turns the training transcripts of a manifest
into espeak-ng recordings and writes a second manifest, the source's lines plus the synthetic ones, so that an
A/B needs no second copy of the corpus: train once on the source manifest and once on the new one.

Synthetic utterances are `train` only: validation and the held-out test sets stay the real recordings, so the
validation curve and `scripts/heldout_speakers.py` compare the two runs on the same audio. Each (language,
variant) is its own speaker, `espeak_<language>_<variant>`, so `--data.speaker_balance` and the run's
`train_crops_per_speaker` treat it like any other voice.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..audio import load_audio
from ..errors import UserError
from .manifest import Utterance, read_manifest, write_manifest
from .more_voices import SAMPLE_RATE, write_flac

PACKAGE = "espeak-ng"
# The corpus's languages that have sentence transcripts (Asterisk prompts, Fish Fillets dialogue), as espeak-ng
# names them. June Wallack's French is left out on purpose: no synthetic French voice sits near the held-out one.
LANGUAGES = {"en": "en-us", "es": "es", "it": "it", "ru": "ru", "cs": "cs"}
# Three low and two high pitched variants plus two of the Klatt synthesiser (another excitation model).
DEFAULT_VARIANTS = ("m1", "m3", "m7", "f2", "f4", "klatt", "klatt4")

ATTRIBUTION = """\
Synthetic speech (neurocodec data espeak): espeak-ng {version} (GPL-3.0-or-later), reading the source manifest's
training transcripts. Not real speech: training only, never validation or test.
"""


def espeak_version(binary: str = "espeak-ng") -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return out.split(":")[1].split()[0] if ":" in out else out.strip()


def installed_variants(binary: str = "espeak-ng") -> set[str]:
    """Variant names espeak-ng knows (the `!v/<name>` files). It ignores an unknown `+variant` without an error,
    so a typo would silently read in the default voice under another speaker's name."""
    out = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True, check=True).stdout
    return {field.split("/", 1)[1] for line in out.splitlines()[1:] for field in line.split()
            if field.startswith("!v/")}


def synthesize(text: str, voice: str, wav_path: Path, binary: str = "espeak-ng") -> np.ndarray:
    """One utterance as float32 at 16 kHz (espeak-ng writes 22.05 kHz; torchaudio resamples)."""
    result = subprocess.run([binary, "-v", voice, "-w", str(wav_path), "--", text], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"espeak-ng -v {voice} failed: {result.stderr.strip() or result.returncode}")
    return load_audio(wav_path, SAMPLE_RATE)[0].numpy()


def pick_texts(utterances: list[Utterance]) -> dict[str, list[str]]:
    """Training transcripts per espeak language, deduplicated, in manifest order (the build is deterministic)."""
    texts: dict[str, dict[str, None]] = {}  # a dict keeps the first-seen order and drops repeats
    for u in utterances:
        if u.split == "train" and u.text and u.language in LANGUAGES:
            texts.setdefault(u.language, {})[u.text] = None
    return {lang: list(own) for lang, own in texts.items()}


def build_espeak_corpus(manifest: str | Path, out_dir: str | Path, minutes: float,
                        variants: tuple[str, ...] = DEFAULT_VARIANTS, binary: str = "espeak-ng",
                        progress: bool = True) -> dict:
    """Write `minutes` of synthetic speech (spread evenly over languages x variants) under `out_dir/audio/espeak/`,
    `out_dir/espeak.jsonl` (those lines) and `out_dir/manifest.jsonl` (the source's lines, then them).
    Clips already written are kept, so a rerun resumes. Returns a summary."""
    if minutes <= 0:
        raise UserError(f"--minutes must be > 0, got {minutes}")
    variants = tuple(dict.fromkeys(variants))  # a repeated variant would repeat its speaker's clip ids
    if not variants:
        raise UserError("no espeak-ng variants given")
    if shutil.which(binary) is None:
        raise UserError(f"{binary} not found: install the Debian package {PACKAGE} (apt-get install {PACKAGE})")
    unknown = sorted(set(variants) - installed_variants(binary))
    if unknown:
        raise UserError(f"unknown espeak-ng variant(s) {unknown}; `espeak-ng --voices=variant` lists them")
    manifest, out_dir = Path(manifest), Path(out_dir)
    if (out_dir / "manifest.jsonl").resolve() == manifest.resolve():
        raise UserError(f"-o {out_dir} would overwrite {manifest}; write the synthetic corpus to another folder")
    source = read_manifest(manifest)  # paths come back absolute; write_manifest re-roots them at out_dir
    texts = pick_texts(source)
    if not texts:
        raise UserError(f"{manifest}: no training lines with a transcript in {sorted(LANGUAGES)}; "
                        "espeak-ng needs text to read")
    voices = [(lang, variant) for lang in sorted(texts) for variant in variants]
    seconds_per_voice = minutes * 60.0 / len(voices)

    synthetic: list[Utterance] = []
    failed: list[tuple[str, str]] = []
    bar = tqdm(total=round(minutes * 60.0), desc="espeak-ng", unit="s", disable=not progress)
    with tempfile.TemporaryDirectory() as tmp:
        wav_path = Path(tmp) / "utterance.wav"
        for lang, variant in voices:
            speaker = f"espeak_{lang}_{variant}"
            own = texts[lang]
            # Each voice starts at its own offset in the texts, so that voices of a language read different ones.
            start = (variants.index(variant) * len(own)) // len(variants)
            seconds, i = 0.0, 0
            while seconds < seconds_per_voice and i < len(own):
                text = own[(start + i) % len(own)]
                clip_id = f"{speaker}_{i:05d}"
                dst = out_dir / "audio" / "espeak" / speaker / f"{clip_id}.flac"
                i += 1
                try:
                    if not (dst.is_file() and dst.stat().st_size > 0):
                        wave = synthesize(text, f"{LANGUAGES[lang]}+{variant}", wav_path, binary)
                        if wave.size == 0 or not np.any(wave):
                            raise RuntimeError("espeak-ng wrote no sound")
                        write_flac(dst, wave)
                    duration = sf.info(str(dst)).duration
                except Exception as err:  # noqa: BLE001 - one text espeak-ng cannot read must not stop the build
                    failed.append((f"{speaker}: {text[:60]}", " ".join(str(err).split()) or type(err).__name__))
                    continue
                seconds += duration
                bar.update(round(duration))
                synthetic.append(Utterance(id=clip_id, path=str(dst.resolve()), duration=round(duration, 4),
                                           sample_rate=SAMPLE_RATE, channels=1, text=text, speaker=speaker,
                                           language=lang, split="train"))
    bar.close()
    if not synthetic:
        raise UserError(f"espeak-ng produced nothing; first failure: {failed[0] if failed else 'none'}")

    write_manifest(out_dir / "espeak.jsonl", synthetic)
    write_manifest(out_dir / "manifest.jsonl", [*source, *synthetic])
    source_attribution = manifest.parent / "ATTRIBUTION.txt"  # the real audio's credits travel with the manifest
    credits = source_attribution.read_text(encoding="utf-8") + "\n" if source_attribution.is_file() else ""
    (out_dir / "ATTRIBUTION.txt").write_text(credits + ATTRIBUTION.format(version=espeak_version(binary)),
                                             encoding="utf-8")
    speakers: dict[str, float] = {}
    for u in synthetic:
        speakers[u.speaker] = speakers.get(u.speaker, 0.0) + (u.duration or 0.0)
    return {"files": len(synthetic), "minutes": sum(speakers.values()) / 60.0, "speakers": speakers,
            "source_lines": len(source), "failed": failed}
