"""The real-speech corpus from Debian's Asterisk prompt packages (`neurocodec data debian`).

Debian ships the Asterisk "core sounds" -- professionally recorded telephone prompts -- as 16 kHz G.722 in
`asterisk-core-sounds-{en,es,fr,it,ru}-g722` (about 25 minutes per voice, 2 hours in all), with the prompt
texts in `/usr/share/doc/asterisk-core-sounds-<lang>/core-sounds-<lang>.txt.gz`, and royalty-free
music-on-hold in `asterisk-moh-opsound-g722`. We decode the G.722 to 16 kHz FLAC, attach the prompt texts
and the speaker/language of each voice, and split by speaker: the French voice (June Wallack) never occurs
in training, so test figures are on an unseen speaker. English and Spanish are the same person (Allison
Smith), so they share a speaker id and both stay on the training side.

`build_demo` picks the small committed corpus `data/demo/` out of a built corpus.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..errors import UserError
from . import more_voices as more_voices_module
from .manifest import Utterance, read_manifest, train_or_valid, write_manifest

SAMPLE_RATE = 16000
G722_BITRATE = 64000  # the Asterisk files are 64 kbit/s G.722 (8000 bytes per second of audio)


@dataclass(frozen=True)
class Voice:
    language: str
    folder: str  # folder under /usr/share/asterisk/sounds
    speaker: str
    name: str  # the person (or provider) credited in the package's copyright file
    license: str

    @property
    def package(self) -> str:
        return f"asterisk-core-sounds-{self.language}-g722"


VOICES = [
    Voice("en", "en_US_f_Allison", "allison_smith", "Allison Smith", "CC-BY-SA-3.0"),
    Voice("es", "es_MX_f_Allison", "allison_smith", "Allison Smith", "CC-BY-SA-3.0"),
    Voice("fr", "fr_CA_f_June", "june_wallack", "June Wallack", "CC-BY-SA-3.0"),
    Voice("it", "it_IT_m_Carlo", "carlo_flora", "Carlo Flora", "CC-BY-3.0"),
    Voice("ru", "ru_RU_f_IvrvoiceRU", "ivrvoice_ru", "IVRvoice.ru (provided by Maxim Topal)", "CC-BY-3.0"),
]
VOICE_BY_LANG = {v.language: v for v in VOICES}
TEST_LANGUAGE = "fr"  # the held-out speaker: June Wallack (female, fr-CA), unseen by training
MOH_PACKAGE = "asterisk-moh-opsound-g722"
MOH_LICENSE = "CC-BY-SA-3.0"
SOUNDS_DIR = Path("/usr/share/asterisk/sounds")
MOH_DIR = Path("/usr/share/asterisk/moh")
DOC_DIR = Path("/usr/share/doc")

# Prompts that are not speech: tone files and the `silence/` folder.
NON_SPEECH = {"beep", "beeperr", "ascending-2tone", "descending-2tone"}

ATTRIBUTION = """\
Speech: the Asterisk core sound prompts, as packaged by Debian (asterisk-core-sounds-<lang>-g722,
upstream http://downloads.asterisk.org/pub/telephony/sounds/), decoded from G.722 to 16 kHz FLAC.
  en (en_US_f_Allison), es (es_MX_f_Allison): Copyright 2003-2010 Allison Smith (http://www.theivrvoice.com),
      financial contributions by Digium, Inc. License: CC-BY-SA-3.0.
  fr (fr_CA_f_June): Copyright 2006-2008 June Wallack (http://www.junewallack.com); translated into French by
      Clod Patry, Kristopher Lalletti and June Wallack; contributions by Digium, Unlimitel, BGM Informatique.
      License: CC-BY-SA-3.0.
  it (it_IT_m_Carlo): Copyright 2012 Carlo Flora (http://www.carloflora.com, http://www.segreterietelefoniche.it),
      translated by Silvia Petrin. License: CC-BY-3.0.
  ru (ru_RU_f_IvrvoiceRU): Copyright 2010 Maxim Topal (http://www.ivrvoice.ru). License: CC-BY-3.0.
Music (music.jsonl only; not in data/demo): asterisk-moh-opsound-g722 -- Paul Shuler (Macroform), Manolo Camp,
  Reno Project; License: CC-BY-SA-3.0.
Licences: https://creativecommons.org/licenses/by-sa/3.0/ and https://creativecommons.org/licenses/by/3.0/
(full texts in /usr/share/doc/<package>/copyright on Debian).
Changes made: G.722 decoded to 16-bit PCM and stored as FLAC; a subset of the files selected; no other edits.
"""


# -- packages ----------------------------------------------------------------------------------------------
def _installed(package: str) -> bool:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return False
    return out.returncode == 0 and "install ok installed" in out.stdout


def ensure_packages(packages: list[str], alternative: str = "pass --sounds-dir/--moh-dir with the unpacked "
                    "Asterisk sound archives, or --no-install") -> list[str]:
    """apt-get install the packages that are missing; returns those installed now. `alternative` ends the
    error message when that cannot be done (what else the user can do)."""
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return []
    hint = f"install them (sudo apt-get install {' '.join(missing)}), or {alternative}"
    if shutil.which("apt-get") is None:
        raise UserError(f"missing Debian packages {', '.join(missing)} and no apt-get on this machine: {hint}")
    if os.geteuid() != 0:
        raise UserError(f"missing Debian packages {', '.join(missing)} and not running as root: {hint}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print(f"apt-get install {' '.join(missing)}", file=sys.stderr)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            tail = " ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
            raise UserError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {tail}")
    return missing


# -- G.722 and transcripts ---------------------------------------------------------------------------------
def decode_g722(data: bytes) -> np.ndarray:
    """G.722 at 64 kbit/s -> int16 samples at 16 kHz (two samples per byte)."""
    from G722 import G722  # imported here: only this command needs the C extension

    return np.frombuffer(G722(SAMPLE_RATE, G722_BITRATE).decode(data), dtype=np.int16).copy()


def g722_to_flac(src: str | Path, dst: str | Path) -> float:
    """Decode one .g722 file to a 16 kHz 16-bit FLAC (written atomically); returns its duration in seconds."""
    data = Path(src).read_bytes()
    if not data:
        raise ValueError("empty file")
    pcm = decode_g722(data)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    sf.write(str(tmp), pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    tmp.replace(dst)
    return len(pcm) / SAMPLE_RATE


_PROMPT_LINE = re.compile(r"^([^\s:;]+)\s*:\s*(.*)$")


def parse_transcripts(text: str) -> dict[str, str]:
    """`core-sounds-<lang>.txt`: `name: text` lines (name = path under the voice folder, no extension)."""
    out = {}
    for line in text.lstrip("\ufeff").splitlines():
        m = _PROMPT_LINE.match(line.strip())
        if m and m.group(2).strip():
            out[m.group(1)] = m.group(2).strip()
    return out


def load_transcripts(language: str, sounds_dir: Path) -> dict[str, str]:
    names = [f"core-sounds-{language}.txt.gz", f"core-sounds-{language}.txt"]
    # A file beside the sounds (the upstream archives ship it there) wins over the Debian doc folder.
    places = [sounds_dir, _voice_dir(VOICE_BY_LANG[language], sounds_dir), DOC_DIR / f"asterisk-core-sounds-{language}"]
    places = [p for p in places if p is not None]
    for place in places:
        for name in names:
            path = place / name
            if path.is_file():
                opener = gzip.open if name.endswith(".gz") else open
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    return parse_transcripts(f.read())
    return {}


def _voice_dir(voice: Voice, sounds_dir: Path) -> Path | None:
    for name in (voice.folder, voice.language):
        if (sounds_dir / name).is_dir():
            return sounds_dir / name
    return None


def _is_speech(key: str) -> bool:
    return not key.startswith("silence/") and key not in NON_SPEECH


def _split_for(voice: Voice, key: str, test_language: str) -> str:
    if voice.language == test_language:
        return "test"
    return train_or_valid(key)


# -- the corpus --------------------------------------------------------------------------------------------
def build_corpus(out_dir: str | Path, languages: list[str] | None = None, test_language: str | None = TEST_LANGUAGE,
                 sounds_dir: str | Path = SOUNDS_DIR, moh_dir: str | Path = MOH_DIR, install: bool = True,
                 music: bool = True, progress: bool = True, more_voices: bool = False) -> dict:
    """Decode the prompts (and music) to FLAC under `out_dir` and write the manifests. Returns a summary.

    `more_voices`: add the other real voices of Debian's packages (data/more_voices.py), with two more speakers
    held out. Each held-out speaker also gets its own manifest, `test_<speaker>.jsonl`.
    Files already decoded (from an earlier run) are kept, so an interrupted build resumes.
    """
    languages = languages or [v.language for v in VOICES]
    unknown = [lang for lang in languages if lang not in VOICE_BY_LANG]
    if unknown:
        raise UserError(f"unknown language(s) {unknown}; choose from {sorted(VOICE_BY_LANG)}")
    if test_language is not None and test_language not in languages:  # None: no held-out voice (GPU kit)
        raise UserError(f"the held-out test voice {test_language!r} is not among the languages {languages}")
    voices = [VOICE_BY_LANG[lang] for lang in languages]
    sounds_dir, moh_dir, out_dir = Path(sounds_dir), Path(moh_dir), Path(out_dir)
    if install:
        packages = [v.package for v in voices if _voice_dir(v, sounds_dir) is None]
        if music and not moh_dir.is_dir():
            packages.append(MOH_PACKAGE)
        if more_voices:
            packages += more_voices_module.PACKAGES
        ensure_packages(packages)

    jobs = []  # (voice or None for music, key, source, destination)
    for voice in voices:
        vdir = _voice_dir(voice, sounds_dir)
        if vdir is None:
            raise UserError(f"no {voice.language} voice under {sounds_dir} (expected {voice.folder}/); "
                            f"install {voice.package} or pass --sounds-dir")
        for src in sorted(vdir.rglob("*.g722")):
            key = src.relative_to(vdir).with_suffix("").as_posix()
            if _is_speech(key):
                jobs.append((voice, key, src, out_dir / "audio" / voice.folder / f"{key}.flac"))
    if music:
        if not moh_dir.is_dir():
            raise UserError(f"no music-on-hold folder {moh_dir}; install {MOH_PACKAGE} or pass --moh-dir / --no-music")
        for src in sorted(moh_dir.glob("*.g722")):
            jobs.append((None, src.stem, src, out_dir / "music" / f"{src.stem}.flac"))
    if not jobs:
        raise UserError(f"no .g722 files found under {sounds_dir}")

    transcripts = {v.language: load_transcripts(v.language, sounds_dir) for v in voices}
    speech: list[Utterance] = []
    songs: list[Utterance] = []
    failed: list[tuple[str, str]] = []
    for voice, key, src, dst in tqdm(jobs, desc="decoding G.722", unit="file", disable=not progress):
        try:
            if dst.is_file() and dst.stat().st_size > 0:
                duration = sf.info(str(dst)).duration
            else:
                duration = g722_to_flac(src, dst)
        except Exception as err:  # one bad file must not stop a 2-hour build
            failed.append((str(src), " ".join(str(err).split()) or type(err).__name__))
            continue
        if voice is None:
            songs.append(Utterance(id=f"moh_{key}", path=str(dst), duration=round(duration, 4),
                                   sample_rate=SAMPLE_RATE, channels=1))
            continue
        speech.append(Utterance(
            id=f"{voice.language}_{key.replace('/', '_')}", path=str(dst), duration=round(duration, 4),
            sample_rate=SAMPLE_RATE, channels=1, text=transcripts[voice.language].get(key),
            speaker=voice.speaker, language=voice.language, split=_split_for(voice, key, test_language)))

    attribution = ATTRIBUTION
    if more_voices:
        more, more_failed = more_voices_module.build_more_voices(out_dir, progress=progress)
        speech += more
        failed += more_failed
        attribution += "\n" + more_voices_module.ATTRIBUTION
    write_manifest(out_dir / "manifest.jsonl", speech)
    for split in ("train", "valid", "test"):
        write_manifest(out_dir / f"{split}.jsonl", [u for u in speech if u.split == split])
    for speaker in sorted({u.speaker for u in speech if u.split == "test"}):
        write_manifest(out_dir / f"test_{speaker}.jsonl", [u for u in speech if u.split == "test" and u.speaker == speaker])
    if music:
        write_manifest(out_dir / "music.jsonl", songs)
    (out_dir / "ATTRIBUTION.txt").write_text(attribution, encoding="utf-8")
    return summarize(speech, songs, failed)


def summarize(speech: list[Utterance], songs: list[Utterance] = (), failed: list[tuple[str, str]] = ()) -> dict:
    hours: dict[str, float] = defaultdict(float)
    files: dict[str, int] = defaultdict(int)
    for u in speech:
        for group in (f"split {u.split}", f"speaker {u.speaker}"):
            hours[group] += (u.duration or 0.0) / 3600
            files[group] += 1
    if songs:
        hours["music"] = sum(u.duration or 0.0 for u in songs) / 3600
        files["music"] = len(songs)
    return {"hours": dict(hours), "files": dict(files), "failed": list(failed),
            "total_hours": sum((u.duration or 0.0) for u in speech) / 3600,
            "with_text": sum(1 for u in speech if u.text)}


def format_summary(summary: dict) -> str:
    lines = [f"{'':24s} {'files':>6s} {'hours':>7s}"]
    for group in sorted(summary["hours"]):
        lines.append(f"{group:24s} {summary['files'][group]:6d} {summary['hours'][group]:7.3f}")
    lines.append(f"speech: {summary['total_hours']:.3f} h, {summary['with_text']} files with a transcript")
    if summary["failed"]:
        lines.append(f"failed: {len(summary['failed'])} files")
        lines += [f"  {path}: {reason}" for path, reason in summary["failed"][:20]]
    return "\n".join(lines)


# -- the committed demo corpus -----------------------------------------------------------------------------
def build_demo(corpus_manifest: str | Path, demo_dir: str | Path, seconds_per_voice: float = 60.0,
               valid_seconds_per_voice: float = 10.0, min_clip: float = 2.0, max_clip: float = 8.0,
               seed: int = 0) -> dict:
    """Copy a few minutes of the corpus into `demo_dir` (FLAC + manifest.jsonl + README.md + LICENSE).

    For each voice: the sentence-length prompts (min_clip..max_clip seconds, with a transcript), in a seeded
    random order, until `seconds_per_voice`; for training voices the first `valid_seconds_per_voice` of them
    go to `valid`, the rest to `train`; the held-out voice keeps its `test` split.
    """
    rng = np.random.default_rng(seed)
    demo_dir = Path(demo_dir)
    rows = read_manifest(corpus_manifest)
    by_lang: dict[str, list[Utterance]] = defaultdict(list)
    for u in rows:
        if u.text and u.duration and min_clip <= u.duration <= max_clip:
            by_lang[u.language].append(u)
    if not by_lang:
        raise UserError(f"{corpus_manifest}: no prompts of {min_clip}-{max_clip} s with a transcript")
    old = demo_dir / "manifest.jsonl"
    if old.is_file():  # a rebuild replaces the previous selection instead of adding to it
        for u in read_manifest(old):
            Path(u.path).unlink(missing_ok=True)
    chosen: list[Utterance] = []
    for lang in sorted(by_lang):
        pool = sorted(by_lang[lang], key=lambda u: u.id)
        order = rng.permutation(len(pool))
        total = 0.0
        picked = []
        for k in order:
            if total >= seconds_per_voice:
                break
            picked.append(pool[k])
            total += pool[k].duration
        held_out = picked[0].split == "test"
        acc = 0.0
        for u in picked:
            split = "test" if held_out else ("valid" if acc < valid_seconds_per_voice else "train")
            acc += u.duration
            voice = VOICE_BY_LANG[lang]
            rel = Path("audio") / voice.folder / Path(u.path).name
            dst = demo_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(u.path, dst)
            chosen.append(Utterance(id=u.id, path=str(dst), duration=u.duration, sample_rate=u.sample_rate,
                                    channels=u.channels, text=u.text, speaker=u.speaker, language=u.language,
                                    split=split))
    write_manifest(demo_dir / "manifest.jsonl", chosen)
    summary = summarize(chosen)
    (demo_dir / "LICENSE").write_text(ATTRIBUTION, encoding="utf-8")
    (demo_dir / "README.md").write_text(_demo_readme(summary, seconds_per_voice, valid_seconds_per_voice,
                                                     min_clip, max_clip, seed), encoding="utf-8")
    summary["bytes"] = sum(Path(u.path).stat().st_size for u in chosen)
    return summary


def _demo_readme(summary: dict, seconds: float, valid: float, lo: float, hi: float, seed: int) -> str:
    rows = "\n".join(f"| {g} | {summary['files'][g]} | {summary['hours'][g] * 60:.2f} |"
                     for g in sorted(summary["hours"]))
    test = VOICE_BY_LANG[TEST_LANGUAGE]
    return f"""# Demo corpus: real speech from the Asterisk prompts (Debian packages)

A few minutes of professionally recorded telephone prompts in five languages and four speakers,
16 kHz mono 16-bit FLAC, so that the shipped configs train out of the box. `manifest.jsonl` lists every clip
(`id, path, duration, sample_rate, channels, text, speaker, language, split`).

**Held-out speaker:** the French voice, {test.name} (`speaker: {test.speaker}`, `language: fr`), is
`split: test` and is never used for training; evaluation (PESQ etc.) on `test` is on an unseen speaker.
English and Spanish are the same person (Allison Smith, `allison_smith`); they, Italian (Carlo Flora) and
Russian (IVRvoice.ru) give `train` and a few `valid` clips each.

| group | files | minutes |
|---|---|---|
{rows}

## Source and licence

Decoded from Debian's `asterisk-core-sounds-{{en,es,fr,it,ru}}-g722` packages; transcripts from the packages'
`core-sounds-<lang>.txt.gz`. Licences: CC-BY-SA-3.0 (en, es, fr) and CC-BY-3.0 (it, ru); see `LICENSE` for
the attribution of every voice. The clips are unmodified apart from G.722 decoding and FLAC storage.

## Rebuild

```
neurocodec data debian -o /tmp/asterisk --demo data/demo
```

builds the full corpus (about 2 hours; installs the packages with apt-get when missing), then picks, for each
voice, prompts of {lo:g}-{hi:g} s with a transcript in a seeded random order (seed {seed}) until {seconds:g} s;
for training voices the first {valid:g} s of them are `valid`.
"""
