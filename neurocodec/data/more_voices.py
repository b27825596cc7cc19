"""More real voices from Debian's packages, beside the Asterisk prompts (`neurocodec data debian --more-voices`).

The Asterisk corpus has four speakers, one of them held out; a codec trained on it meets few voices and one kind
of studio. These packages add real human speech at 22-44 kHz from other speakers, languages and microphones
(the survey of what the registries hold, and why these: docs/default_model/data_sources.md):

| package | what | speakers (id) |
|---|---|---|
| fillets-ng-data-cs (+ fillets-ng-data for the texts) | Czech dub of the game Fish Fillets NG: acted dialogue, ~106 min | one per character code: `fillets_cs_v` (big fish, male, 41 min), `fillets_cs_m` (small fish, 39 min), ~75 minor ones |
| gcin-voice | Mandarin syllables read one by one, ~0.35 s each | `gcin_3` (Edward Der-Hua Liu, male, 7.8 min), `gcin_5` (Chu Lo, female, 5.9 min) |
| klettres-data | letters and syllables of ~20 languages (KDE KLettres) | one per language and set: `klettres_<lang>_<alpha or syllab>` |

Held out as split `test` by default (`HELD_OUT`): `fillets_cs_m` and `gcin_3` -- a high-pitched Czech voice and a
male Mandarin one on a microphone no training source shares; with the Asterisk corpus's June Wallack that makes
three speakers training never sees. Each held-out speaker also gets its own manifest, `test_<speaker>.jsonl`, so
that `neurocodec eval` reports each one.

Isolated items (syllables, letters) are too short to train or score on one by one (PESQ wants seconds), so the
items of one speaker are joined, in a fixed order, into clips of about `CLIP_SECONDS` with `GAP_SECONDS` of
silence between items; a clip's text lists its items. Everything is resampled to 16 kHz mono FLAC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm

from ..audio import load_audio
from .manifest import Utterance, train_or_valid

SAMPLE_RATE = 16000
CLIP_SECONDS = 4.0  # joined clips of isolated items
GAP_SECONDS = 0.12
HELD_OUT = ("fillets_cs_m", "gcin_3")

FILLETS_DIR = Path("/usr/share/games/fillets-ng")
GCIN_DIR = Path("/usr/share/gcin-voice/ogg")
KLETTRES_DIR = Path("/usr/share/klettres")
PACKAGES = ["fillets-ng-data", "fillets-ng-data-cs", "gcin-voice", "klettres-data"]

ATTRIBUTION = """\
More voices (neurocodec data debian --more-voices), decoded from the Debian packages' Ogg Vorbis to 16 kHz FLAC:
  fillets-ng-data-cs, fillets-ng-data: Fish Fillets NG, Czech voices and dialogue texts, (c) ALTAR interactive and
      the Fish Fillets NG developers. License: GPL-2.
  gcin-voice: Mandarin syllables; voice 3 (c) 2014 Edward Der-Hua Liu, GPL-3 or LGPL-3; voice 5 Chu Lo
      (ChionMeilin recording group), CC-BY-3.0.
  klettres-data: KDE KLettres letter and syllable sounds, (c) Anne-Marie Mahfouf and the KLettres contributors.
      License: GPL-2+.
"""


@dataclass(frozen=True)
class Item:
    """One source recording: its file, speaker, language and text."""

    path: Path
    speaker: str
    language: str
    key: str  # unique within the speaker
    text: str | None = None


# -- finding the recordings ----------------------------------------------------------------------------
_STRING = r'"(?:[^"\\]|\\.)*"'
# dialogId("<stem>", <font>, "<English>") -- arguments are strings or names -- then dialogStr("<translation>")
_DIALOG = re.compile(rf'dialogId\(\s*"([^"]+)"(?:\s*,\s*(?:{_STRING}|\w+))*\s*\)\s*dialogStr\(\s*({_STRING})\s*\)')


def parse_fillets_dialogs(text: str) -> dict[str, str]:
    """`dialogs_<lang>.lua`: `dialogId("<sound stem>", font, "<English>")` followed by `dialogStr("<translation>")`."""
    return {m.group(1): m.group(2)[1:-1].replace('\\"', '"') for m in _DIALOG.finditer(text)}


def fillets_speaker(stem: str) -> str:
    """The character code of a Fish Fillets sound (`bar-v-videt0` -> `v`; `m-silou` -> `m`)."""
    parts = stem.split("-")
    return parts[1] if len(parts) >= 3 else parts[0]


def fillets_items(root: Path = FILLETS_DIR, language: str = "cs") -> list[Item]:
    texts: dict[str, str] = {}
    for lua in sorted((root / "script").rglob(f"dialogs_{language}.lua")):
        texts.update(parse_fillets_dialogs(lua.read_text(encoding="utf-8", errors="replace")))
    items = []
    for path in sorted((root / "sound").glob(f"*/{language}/*.ogg")):
        stem = path.stem
        items.append(Item(path, f"fillets_{language}_{fillets_speaker(stem)}", language,
                          f"{path.parent.parent.name}/{stem}", texts.get(stem)))
    return items


def gcin_items(root: Path = GCIN_DIR) -> list[Item]:
    """`<zhuyin syllable + tone>/<voice>.ogg`: one syllable per file, the folder name is its text."""
    return [Item(path, f"gcin_{path.stem}", "zh", path.parent.name, path.parent.name)
            for path in sorted(root.glob("*/*.ogg"))]


def klettres_items(root: Path = KLETTRES_DIR) -> list[Item]:
    """`<lang>/<alpha|syllab>/<item>.ogg`: one person per language and set (a language's two sets can differ)."""
    return [Item(path, f"klettres_{path.parent.parent.name}_{path.parent.name}", path.parent.parent.name,
                 path.stem, path.stem)
            for path in sorted(root.glob("*/*/*.ogg")) if path.parent.name in ("alpha", "syllab")]


# -- clips ---------------------------------------------------------------------------------------------------
def join_items(waves: list[np.ndarray], gap: int) -> np.ndarray:
    """The items one after another with `gap` samples of silence between them."""
    pieces = []
    for i, wave in enumerate(waves):
        if i:
            pieces.append(np.zeros(gap, dtype=np.float32))
        pieces.append(wave)
    return np.concatenate(pieces)


def _split(speaker: str, clip_id: str, held_out: tuple[str, ...]) -> str:
    if speaker in held_out:
        return "test"
    return train_or_valid(clip_id)


def write_flac(dst: Path, wave: np.ndarray) -> None:
    """16 kHz 16-bit FLAC, written to a temporary name and renamed (an interrupted build leaves no half file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    sf.write(str(tmp), np.clip(wave, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    tmp.replace(dst)


def build_clips(items: list[Item], out_dir: Path, source: str, isolated: bool,
                held_out: tuple[str, ...] = HELD_OUT, progress: bool = True) -> tuple[list[Utterance], list]:
    """Decode `items` to 16 kHz FLAC under `out_dir/audio/<source>/`: one clip per item, or (`isolated`) each
    speaker's items joined into ~CLIP_SECONDS clips. Clips already written are kept (a rerun resumes)."""
    utterances: list[Utterance] = []
    failed: list[tuple[str, str]] = []
    gap = int(GAP_SECONDS * SAMPLE_RATE)
    groups: list[tuple[str, list[Item]]] = []  # (clip id, items)
    if isolated:
        by_speaker: dict[str, list[Item]] = {}
        for item in items:
            by_speaker.setdefault(item.speaker, []).append(item)
        for speaker, own in by_speaker.items():
            clip, seconds = [], 0.0
            for item in own:
                clip.append(item)
                seconds += _duration(item.path) + GAP_SECONDS
                if seconds >= CLIP_SECONDS:
                    groups.append((f"{speaker}_{len(groups):05d}", clip))
                    clip, seconds = [], 0.0
            if clip:
                groups.append((f"{speaker}_{len(groups):05d}", clip))
    else:
        groups = [(f"{item.speaker}_{item.key.replace('/', '_')}", [item]) for item in items]
    for clip_id, group in tqdm(groups, desc=f"decoding {source}", unit="clip", disable=not progress):
        dst = out_dir / "audio" / source / f"{clip_id}.flac"
        try:
            if not (dst.is_file() and dst.stat().st_size > 0):
                waves = [load_audio(item.path, SAMPLE_RATE)[0].numpy() for item in group]
                wave = join_items(waves, gap)
                if wave.size == 0:
                    raise ValueError("no samples")
                write_flac(dst, wave)
            duration = sf.info(str(dst)).duration
        except Exception as err:  # one bad file must not stop the build
            failed.append((str(group[0].path), " ".join(str(err).split()) or type(err).__name__))
            continue
        first = group[0]
        text = " ".join(item.text for item in group if item.text) or None
        utterances.append(Utterance(id=clip_id, path=str(dst), duration=round(duration, 4), sample_rate=SAMPLE_RATE,
                                    channels=1, text=text, speaker=first.speaker, language=first.language,
                                    split=_split(first.speaker, clip_id, held_out)))
    return utterances, failed


def _duration(path: Path) -> float:
    """Seconds of a source file from its header; 0 when unreadable (the decode then records why)."""
    try:
        return sf.info(str(path)).duration
    except Exception:  # noqa: BLE001
        return 0.0


def build_more_voices(out_dir: str | Path, held_out: tuple[str, ...] = HELD_OUT,
                      progress: bool = True) -> tuple[list[Utterance], list]:
    """Every source that is installed (see `PACKAGES`; the folders are this module's `*_DIR`), as utterances with
    speakers and splits, and the files that failed as (path, reason)."""
    out_dir = Path(out_dir)
    sources = [("fillets_cs", fillets_items(FILLETS_DIR) if FILLETS_DIR.is_dir() else [], False),
               ("gcin", gcin_items(GCIN_DIR) if GCIN_DIR.is_dir() else [], True),
               ("klettres", klettres_items(KLETTRES_DIR) if KLETTRES_DIR.is_dir() else [], True)]
    utterances: list[Utterance] = []
    failed: list = []
    for source, items, isolated in sources:
        got, bad = build_clips(items, out_dir, source, isolated, held_out, progress)
        utterances += got
        failed += bad
    return utterances, failed
