"""`neurocodec data debian --more-voices`: the other real voices of Debian's packages, with held-out speakers.

The package layouts are rebuilt in a temporary folder from real speech of the demo corpus (Ogg Vorbis at the
packages' rates), so the test needs no package installed.
"""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from neurocodec.audio import load_audio
from neurocodec.cli import main
from neurocodec.data import more_voices
from neurocodec.data.manifest import read_manifest

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "manifest.jsonl"


def _speech(seconds: float, rate: int, offset: int = 0) -> np.ndarray:
    utts = read_manifest(DEMO)
    audio = np.concatenate([load_audio(u.path, rate)[0].numpy() for u in utts[offset:offset + 4]])
    return audio[: int(seconds * rate)]


def _ogg(path: Path, audio: np.ndarray, rate: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, rate, format="OGG", subtype="VORBIS")


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Fish Fillets (Czech dialogue + texts), gcin-voice (two voices) and KLettres layouts."""
    fillets, gcin, klettres = tmp_path / "fillets-ng", tmp_path / "gcin-voice" / "ogg", tmp_path / "klettres"
    _ogg(fillets / "sound" / "city" / "cs" / "vit-v-proc.ogg", _speech(1.5, 22050), 22050)
    _ogg(fillets / "sound" / "city" / "cs" / "vit-m-hlava.ogg", _speech(1.2, 22050, 4), 22050)
    _ogg(fillets / "sound" / "share" / "cs" / "m-silou.ogg", _speech(0.8, 44100, 8), 44100)
    (fillets / "sound" / "city" / "cs" / "vit-v-broken.ogg").write_bytes(b"OggS not really")
    (fillets / "script" / "city").mkdir(parents=True)
    (fillets / "script" / "city" / "dialogs_cs.lua").write_text(
        'dialogId("vit-v-proc", "font_big", "Why?")\ndialogStr("Pro\\"c?")\n\n'
        'dialogId("vit-m-hlava", "font_small", "Head.")\ndialogStr("Hlava.")\n', encoding="utf-8")
    for i, syllable in enumerate(["ㄅㄚ1", "ㄇㄚ3", "ㄉㄚ4"] * 6):  # 18 syllables of 0.35 s per voice
        for voice in ("3", "5"):
            _ogg(gcin / f"{syllable}{i}" / f"{voice}.ogg", _speech(0.35, 44100, i % 8), 44100)
    for letter in "abcdefghijklmnopq":
        _ogg(klettres / "cs" / "alpha" / f"{letter}.ogg", _speech(0.4, 44100, 2), 44100)
    _ogg(klettres / "cs" / "pics" / "x.ogg", _speech(0.4, 44100), 44100)  # not a letter set: left out
    monkeypatch.setattr(more_voices, "FILLETS_DIR", fillets)
    monkeypatch.setattr(more_voices, "GCIN_DIR", gcin)
    monkeypatch.setattr(more_voices, "KLETTRES_DIR", klettres)
    return tmp_path


def test_fillets_speakers_and_dialog_texts():
    assert [more_voices.fillets_speaker(s) for s in ("bar-v-videt0", "m-silou", "vit-hs-klid1")] == ["v", "m", "hs"]
    lua = 'dialogId("a-v-x", "font_big", "One (\\"1\\").")\ndialogStr("Jedna (\\"1\\").")\n'
    assert more_voices.parse_fillets_dialogs(lua) == {"a-v-x": 'Jedna ("1").'}


def test_more_voices_give_16k_clips_with_speakers_texts_and_held_out_speakers(packages):
    utts, failed = more_voices.build_more_voices(packages / "out", progress=False)
    by_speaker = {}
    for u in utts:
        by_speaker.setdefault(u.speaker, []).append(u)
        info = sf.info(u.path)
        assert info.samplerate == 16000 and info.channels == 1 and u.duration == pytest.approx(info.duration, abs=1e-3)
    assert set(by_speaker) == {"fillets_cs_v", "fillets_cs_m", "gcin_3", "gcin_5", "klettres_cs_alpha"}
    assert [Path(p).name for p, _ in failed] == ["vit-v-broken.ogg"]  # one bad file; the others are built
    # dialogue: one clip per line, with its Czech text where the scripts have one
    texts = {u.id: u.text for u in by_speaker["fillets_cs_v"] + by_speaker["fillets_cs_m"]}
    assert texts == {"fillets_cs_v_city_vit-v-proc": 'Pro"c?', "fillets_cs_m_city_vit-m-hlava": "Hlava.",
                     "fillets_cs_m_share_m-silou": None}
    # isolated syllables are joined into clips of about CLIP_SECONDS, each listing its syllables
    gcin = by_speaker["gcin_3"]
    syllables = [t for u in gcin for t in u.text.split()]  # each clip lists its syllables, in order, none twice
    assert len(gcin) == 2 and syllables == sorted(syllables) and len(set(syllables)) == 18
    assert gcin[0].duration >= more_voices.CLIP_SECONDS - 0.5
    assert sum(u.duration for u in gcin) == pytest.approx(18 * 0.35 + 16 * more_voices.GAP_SECONDS, abs=0.05)
    # the held-out speakers never reach training
    for u in utts:
        assert (u.split == "test") == (u.speaker in more_voices.HELD_OUT)
        assert u.split in ("train", "valid", "test")
    # a rerun keeps the clips already written
    stamp = {u.path: Path(u.path).stat().st_mtime_ns for u in utts}
    again, _ = more_voices.build_more_voices(packages / "out", progress=False)
    assert [u.id for u in again] == [u.id for u in utts]
    assert all(Path(u.path).stat().st_mtime_ns == stamp[u.path] for u in again)


def test_debian_command_adds_more_voices_and_a_manifest_per_held_out_speaker(packages):
    from G722 import G722

    sounds = packages / "sounds"
    for folder, seconds in (("en_US_f_Allison", 1.0), ("fr_CA_f_June", 1.0)):
        pcm = (np.clip(_speech(seconds, 16000), -1, 1) * 32767).astype(np.int16)
        (sounds / folder).mkdir(parents=True)
        (sounds / folder / "hello.g722").write_bytes(G722(16000, 64000).encode(pcm))
    out = packages / "corpus"
    assert main(["data", "debian", "-o", str(out), "--languages", "en,fr", "--no-install", "--no-music",
                 "--sounds-dir", str(sounds), "--more-voices"]) == 0
    rows = read_manifest(out / "manifest.jsonl")
    test_speakers = {u.speaker for u in rows if u.split == "test"}
    assert test_speakers == {"june_wallack", "fillets_cs_m", "gcin_3"}
    for speaker in test_speakers:
        own = read_manifest(out / f"test_{speaker}.jsonl")
        assert own and {u.speaker for u in own} == {speaker}
    assert {u.speaker for u in read_manifest(out / "train.jsonl")} >= {"allison_smith", "fillets_cs_v", "gcin_5"}
    assert "gcin-voice" in (out / "ATTRIBUTION.txt").read_text()
