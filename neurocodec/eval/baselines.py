"""Classic codecs to compare against, run through their real command-line encoders and decoders.

* Opus (`opusenc` / `opusdec` / `opusinfo` from Debian `opus-tools`): `opus:6` is libopus at 6 kbit/s in
  hard CBR (`--hard-cbr`), so the bitrate is the one asked for, not an average a VBR encoder chose. The
  clip is given at its own rate (16 kHz) and decoded back at that rate. The measured bitrate is the Opus
  payload without the Ogg container (as `opusinfo` reports it).
* Codec2 (`c2enc` / `c2dec` from Debian `codec2`): `codec2:3200` etc. Codec2 codes 8 kHz 16-bit raw
  speech, so the clip is resampled to 8 kHz (torchaudio), coded, and resampled back to the clip's rate.
  It is then scored like every other system against the same wide-band reference (PESQ-WB at 16 kHz), so
  the 4-8 kHz band it cannot carry counts against it; the `pesq_nb` column compares all systems at 8 kHz.
* `identity`: the clip itself (a sanity row: PESQ-WB 4.64, STOI 1).

`scripts/setup.sh` installs both packages; a missing binary is a `BaselineError` naming the package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ..audio import resample
from ..errors import UserError

CODEC2_MODES = {"3200": 3200, "2400": 2400, "1600": 1600, "1400": 1400, "1300": 1300, "1200": 1200,
                "700C": 700, "450": 450}
OPUS_MIN_KBPS, OPUS_MAX_KBPS = 6.0, 256.0
TOOLS = {"opus": (("opusenc", "opusdec", "opusinfo"), "opus-tools"), "codec2": (("c2enc", "c2dec"), "codec2")}


class BaselineError(UserError):
    """A baseline codec cannot run (missing binary, bad setting, the tool failed)."""


@dataclass(frozen=True)
class Baseline:
    codec: str  # "opus" | "codec2" | "identity"
    setting: str = ""  # opus: kbit/s as given ("6"); codec2: mode ("3200", "700C")

    @property
    def name(self) -> str:
        if self.codec == "opus":
            return f"Opus {self.kbps:g} kbps"
        if self.codec == "codec2":
            return f"Codec2 {self.setting}"
        return "identity"

    @property
    def kbps(self) -> float:
        """Nominal bitrate in kbit/s."""
        if self.codec == "opus":
            return float(self.setting)
        if self.codec == "codec2":
            return CODEC2_MODES[self.setting] / 1000.0
        return float("nan")

    def check_tools(self) -> None:
        if self.codec not in TOOLS:
            return
        binaries, package = TOOLS[self.codec]
        missing = [b for b in binaries if shutil.which(b) is None]
        if missing:
            raise BaselineError(f"{self.name} needs {', '.join(missing)} on PATH: install the Debian package "
                                f"{package} (scripts/setup.sh does: apt-get install {package})")

    def run(self, wav: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
        """Code and decode a mono float clip; returns (decoded audio at `sample_rate`, measured kbit/s)."""
        wav = np.asarray(wav, dtype=np.float32).reshape(-1)
        if self.codec == "identity":
            return wav.copy(), float("nan")
        self.check_tools()
        with tempfile.TemporaryDirectory(prefix=f"neurocodec-{self.codec}-") as tmp:
            if self.codec == "opus":
                return _opus(wav, sample_rate, self.setting, Path(tmp))
            return _codec2(wav, sample_rate, self.setting, Path(tmp))


def parse_baselines(spec: str | None) -> list[Baseline]:
    """'opus:6,opus:12,codec2:3200,identity' -> baselines (validated, in the order given, no duplicates)."""
    out: list[Baseline] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item or item.lower() == "none":
            continue
        codec, _, setting = item.partition(":")
        codec = codec.strip().lower()
        setting = setting.strip()
        if codec == "opus":
            try:
                kbps = float(setting)
            except ValueError:
                raise BaselineError(f"baseline {item!r}: Opus needs a bitrate in kbit/s, e.g. opus:6") from None
            if not OPUS_MIN_KBPS <= kbps <= OPUS_MAX_KBPS:
                raise BaselineError(f"baseline {item!r}: Opus codes mono at {OPUS_MIN_KBPS:g}-{OPUS_MAX_KBPS:g} kbit/s")
            base = Baseline("opus", f"{kbps:g}")
        elif codec == "codec2":
            mode = setting.upper()
            if mode not in CODEC2_MODES:
                raise BaselineError(f"baseline {item!r}: Codec2 mode must be one of {', '.join(CODEC2_MODES)}")
            base = Baseline("codec2", mode)
        elif codec == "identity":
            base = Baseline("identity")
        else:
            raise BaselineError(f"baseline {item!r}: unknown codec (use opus:KBPS, codec2:MODE or identity)")
        if base not in out:
            out.append(base)
    return out


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise BaselineError(f"{cmd[0]} not found on PATH") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise BaselineError(f"{' '.join(cmd[:2])} ... failed (exit {proc.returncode}): {' / '.join(tail)}")
    return proc


def _to_int16(wav: np.ndarray) -> np.ndarray:
    return np.round(np.clip(wav, -1.0, 1.0 - 1.0 / 32768) * 32768.0).astype("<i2")


def _opus(wav: np.ndarray, sample_rate: int, kbps: str, tmp: Path) -> tuple[np.ndarray, float]:
    src, coded, out = tmp / "in.wav", tmp / "coded.opus", tmp / "out.wav"
    sf.write(str(src), _to_int16(wav), sample_rate, subtype="PCM_16")
    _run(["opusenc", "--quiet", "--hard-cbr", "--bitrate", kbps, str(src), str(coded)])
    # opusdec removes the encoder's pre-skip, so the output starts where the input did (we align anyway).
    _run(["opusdec", "--quiet", "--rate", str(sample_rate), str(coded), str(out)])
    decoded, sr = sf.read(str(out), dtype="float32", always_2d=True)
    if sr != sample_rate:
        raise BaselineError(f"opusdec wrote {sr} Hz, expected {sample_rate} Hz")
    info = _run(["opusinfo", str(coded)]).stdout
    match = re.search(r"w/o overhead:\s*([0-9.]+)\s*kbit/s", info)
    measured = float(match.group(1)) if match else coded.stat().st_size * 8 / 1000 / (len(wav) / sample_rate)
    return decoded.mean(axis=1), measured


def _codec2(wav: np.ndarray, sample_rate: int, mode: str, tmp: Path) -> tuple[np.ndarray, float]:
    src, coded, out = tmp / "in.raw", tmp / "coded.bit", tmp / "out.raw"
    narrow = resample(torch.from_numpy(wav).unsqueeze(0), sample_rate, 8000).squeeze(0).numpy()
    _to_int16(narrow).tofile(src)
    # Headerless bit file (a ".c2" name would make c2enc add a header): its size is exactly the coded bits.
    _run(["c2enc", mode, str(src), str(coded)])
    _run(["c2dec", mode, str(coded), str(out)])
    decoded = np.fromfile(out, dtype="<i2").astype(np.float32) / 32768.0
    measured = coded.stat().st_size * 8 / 1000 / (len(narrow) / 8000)
    back = resample(torch.from_numpy(decoded).unsqueeze(0), 8000, sample_rate).squeeze(0).numpy()
    return back, measured
