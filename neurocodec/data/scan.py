"""Manifests from a folder of audio (`neurocodec data scan`).

Every file with an audio extension that soundfile can read becomes one utterance: duration, rate and
channels from `soundfile.info`; the transcript from a sidecar with the same stem (LibriTTS
`.normalized.txt`, then `.txt`, `.lab`, LibriTTS `.original.txt`) or from a LibriSpeech chapter file
`<speaker>-<chapter>.trans.txt`; the speaker from the folders: `speaker/chapter/file` (LibriSpeech,
LibriTTS: two numeric folders) gives the speaker folder wherever it sits, otherwise the folder that holds
the file (none for files directly in the scanned directory). Files that fail to open are listed and counted, not fatal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from ..errors import UserError
from .manifest import Utterance

# Extensions tried with soundfile: its own formats plus common aliases. Other files (text, json, ...) are
# not audio and are ignored without a complaint.
AUDIO_EXTENSIONS = {f".{fmt.lower()}" for fmt in sf.available_formats()} | {
    ".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".snd", ".caf", ".w64",
    ".rf64", ".sph", ".nist", ".voc", ".wv"}
AUDIO_EXTENSIONS -= {".raw"}  # headerless: soundfile cannot know its rate or format
SIDECARS = (".normalized.txt", ".txt", ".lab", ".original.txt")


@dataclass
class ScanResult:
    utterances: list[Utterance] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return sum(u.duration or 0.0 for u in self.utterances) / 3600


def _read_text(path: Path) -> str | None:
    try:
        text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
    except OSError:
        return None
    return text or None


def _chapter_transcripts(folder: Path, cache: dict[Path, dict[str, str]]) -> dict[str, str]:
    """LibriSpeech: `<spk>-<chapter>.trans.txt` holds `<utterance-id> <text>` lines for the whole folder."""
    if folder not in cache:
        table: dict[str, str] = {}
        for trans in folder.glob("*.trans.txt"):
            for line in trans.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, text = line.strip().partition(" ")
                if key and text.strip():
                    table[key] = text.strip()
        cache[folder] = table
    return cache[folder]


def find_transcript(audio: Path, cache: dict[Path, dict[str, str]] | None = None) -> str | None:
    stem = audio.with_suffix("")
    for ext in SIDECARS:
        side = stem.with_name(stem.name + ext)
        if side.is_file():
            return _read_text(side)
    return _chapter_transcripts(audio.parent, cache if cache is not None else {}).get(stem.name)


def speaker_of(rel: Path) -> str | None:
    folders = rel.parent.parts
    if len(folders) >= 2 and folders[-1].isdigit() and folders[-2].isdigit():
        return folders[-2]  # LibriSpeech / LibriTTS: .../<speaker>/<chapter>/<file>
    return folders[-1] if folders else None  # the folder holding the file (VCTK: wav48/p225/p225_001.wav)


def scan_dir(root: str | Path, progress: bool = True, follow_links: bool = True) -> ScanResult:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_links):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in AUDIO_EXTENSIONS:
                candidates.append(Path(dirpath) / name)
    result = ScanResult()
    cache: dict[Path, dict[str, str]] = {}
    ids: set[str] = set()
    for path in tqdm(candidates, desc=f"scanning {root}", unit="file", disable=not progress):
        try:
            info = sf.info(str(path))
            if info.frames <= 0:
                raise ValueError("no audio frames")
        except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, ...: all mean unreadable
            result.unreadable.append((str(path), " ".join(str(err).split()) or type(err).__name__))
            continue
        rel = path.relative_to(root)
        uid = rel.with_suffix("").as_posix()
        if uid in ids:  # same stem in two formats (a.wav, a.flac): keep both, told apart by extension
            uid = rel.as_posix()
        ids.add(uid)
        result.utterances.append(Utterance(
            id=uid, path=str(path.resolve()), duration=round(info.frames / info.samplerate, 4),
            sample_rate=int(info.samplerate), channels=int(info.channels),
            text=find_transcript(path, cache), speaker=speaker_of(rel)))
    return result
