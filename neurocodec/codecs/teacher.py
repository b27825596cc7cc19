"""The frozen semantic teacher: a speech encoder from Hugging Face `transformers` whose features of one
layer, brought to the codec frame rate, are the targets of semantic families (k-means ids for
`semanticodec`, cosine distillation for `xy_single`).

Config (the `teacher:` section of a training config, `TeacherConfig`):

    teacher:
      source: facebook/hubert-base-ls960   # hub id or local folder (save_pretrained layout)
      kind: hubert                         # hubert | wavlm | wav2vec2 | whisper (default: from the source's config)
      layer: 9                             # hidden state: 0 = input of the first transformer layer, L = last

With `tiny: {<Kind>Config kwargs}` instead of a source, a randomly initialised model is built from that
config with a fixed seed: tests and CPU runs use it, and nothing is downloaded. The loading code is the
one users run with real weights (`AutoModel.from_pretrained`).

`transformers` costs seconds to import, so it is imported only here, when a teacher is built.

Frame alignment (hubert / wavlm / wav2vec2): the convolutional front end has a receptive field of R
samples and a total stride S (400 and 320 for the base models). The input is zero-padded by (R - S) / 2 on
each side, so frame i is centred on samples [i*S, (i+1)*S) and N samples give exactly N / S frames, in
step with the codec's frames. Whisper's encoder reads 30 s log-mel windows (its feature extractor, built
from the model's config when the source has none); longer audio is cut into windows and the frames are
concatenated. Teacher frames (usually 50 Hz) are then brought to the codec frame rate: average pooling
when the codec is slower (25, 12.5 Hz), linear interpolation when it is faster (100 Hz).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError

KINDS = ("hubert", "wavlm", "wav2vec2", "whisper")
# kind -> (transformers config class, model class); model_type of a checkpoint's config.json -> kind
_CLASSES = {
    "hubert": ("HubertConfig", "HubertModel"),
    "wavlm": ("WavLMConfig", "WavLMModel"),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model"),
    "whisper": ("WhisperConfig", "WhisperModel"),
}
_MODEL_TYPES = {"hubert": "hubert", "wavlm": "wavlm", "wav2vec2": "wav2vec2", "whisper": "whisper"}


@dataclass
class TeacherConfig:
    source: str | None = None  # hub id or local folder; loaded with transformers AutoModel.from_pretrained
    kind: str | None = None  # hubert | wavlm | wav2vec2 | whisper; default: the source config's model_type
    layer: int = 9  # hidden state used: 0 = before the first transformer layer, L = after the last; -1 = last
    tiny: dict | None = None  # <Kind>Config kwargs: build a randomly initialised teacher (seeded), no download
    sample_rate: int = 16000  # the teacher's input rate (audio is resampled to it)
    normalize: bool | None = None  # zero-mean unit-variance input; None: the source's feature extractor decides
    seed: int = 0  # initialisation of a tiny teacher

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"teacher.kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.sample_rate <= 0:
            raise ValueError("teacher.sample_rate must be > 0")

    @property
    def configured(self) -> bool:
        return bool(self.source) or self.tiny is not None

    def describe(self) -> str:
        """A one-line name of the teacher, stored with k-means files so they can be matched to it."""
        if self.tiny is not None:
            return f"tiny:{self.kind}:seed{self.seed}:" + json.dumps(self.tiny, sort_keys=True)
        source = Path(str(self.source)).expanduser()
        return str(source.resolve()) if source.exists() else str(self.source)  # same folder, same name


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1  # hub ids are "name" or "org/name"


def _load_transformers_model(config: TeacherConfig) -> tuple[nn.Module, str, object]:
    """(model, kind, feature-extractor config dict or None) for `config`. One-line ConfigErrors."""
    import transformers  # lazily: seconds to import

    if config.tiny is not None:
        if config.kind is None:
            raise ConfigError("teacher.kind is required with teacher.tiny (hubert, wavlm, wav2vec2 or whisper)")
        config_cls = getattr(transformers, _CLASSES[config.kind][0])
        model_cls = getattr(transformers, _CLASSES[config.kind][1])
        if config.kind == "whisper":  # only the encoder is used: do not build a decoder
            from transformers.models.whisper.modeling_whisper import WhisperEncoder as model_cls
        try:
            model_config = config_cls(**config.tiny)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = model_cls(model_config)
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:
            raise ConfigError(f"teacher.tiny: not valid {config_cls.__name__} options ({err})") from None
        return model, config.kind, None
    if not config.source:
        raise ConfigError("teacher: give teacher.source (a hub id or local folder) or teacher.tiny (a config)")
    source = str(Path(config.source).expanduser()) if config.source.startswith("~") else config.source
    if Path(source).exists():
        if not (Path(source) / "config.json").is_file():
            raise ConfigError(f"teacher.source {source}: no config.json there (expected a save_pretrained folder)")
    elif _looks_like_path(source):
        raise ConfigError(f"teacher.source {source}: no such folder")
    try:
        model_config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"teacher.source {source}: cannot load its config ({first})") from None
    kind = _MODEL_TYPES.get(model_config.model_type)
    if kind is None:
        raise ConfigError(f"teacher.source {source} is a {model_config.model_type!r} model; supported: {', '.join(KINDS)}")
    if config.kind is not None and config.kind != kind:
        raise ConfigError(f"teacher.kind is {config.kind} but teacher.source {source} holds a {kind} model")
    try:
        model = transformers.AutoModel.from_pretrained(source)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"teacher.source {source}: cannot load its weights ({first})") from None
    extractor = None
    if Path(source).is_dir() and (Path(source) / "preprocessor_config.json").is_file():
        extractor = json.loads((Path(source) / "preprocessor_config.json").read_text())
    elif not Path(source).exists():
        try:
            extractor = transformers.AutoFeatureExtractor.from_pretrained(source).to_dict()
        except (OSError, ValueError):
            extractor = None
    return model, kind, extractor


class SemanticTeacher(nn.Module):
    """Frozen, eval-mode feature extractor. `features(wav, frame_rate)` -> [B, D, T] at the codec rate.

    Not part of any codec: the training module keeps it outside its state dict (it is not saved in
    checkpoints nor exported), and codecs never need it at inference.
    """

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__()
        self.config = config
        model, self.kind, extractor = _load_transformers_model(config)
        if self.kind == "whisper" and hasattr(model, "encoder"):
            model = model.encoder
        self.model = model.eval().requires_grad_(False)
        mc = model.config
        self.num_layers = mc.encoder_layers if self.kind == "whisper" else mc.num_hidden_layers
        layer = config.layer + self.num_layers + 1 if config.layer < 0 else config.layer
        if not 0 <= layer <= self.num_layers:
            raise ConfigError(f"teacher.layer {config.layer} is out of range for a {self.num_layers}-layer "
                              f"{self.kind} teacher (0..{self.num_layers}, or negative from the end)")
        self.layer = layer
        self.dim = mc.d_model if self.kind == "whisper" else mc.hidden_size
        if self.kind == "whisper":
            self._setup_whisper(extractor)
        else:
            strides, kernels = list(mc.conv_stride), list(mc.conv_kernel)
            self.stride = math.prod(strides)
            receptive, jump = 1, 1
            for k, s in zip(kernels, strides):
                receptive += (k - 1) * jump
                jump *= s
            self.receptive_field = receptive
            if config.normalize is not None:
                self.normalize = config.normalize
            else:
                self.normalize = bool((extractor or {}).get("do_normalize", False))

    def _setup_whisper(self, extractor: dict | None) -> None:
        from transformers import WhisperFeatureExtractor

        mc = self.model.config
        # The encoder takes exactly 2 * max_source_positions mel frames (hop 160): its window in samples.
        hop = int((extractor or {}).get("hop_length", 160))
        window = 2 * mc.max_source_positions * hop
        kwargs = {k: v for k, v in (extractor or {}).items()
                  if k in ("feature_size", "hop_length", "n_fft", "padding_value", "sampling_rate")}
        kwargs.setdefault("feature_size", mc.num_mel_bins)
        fe = WhisperFeatureExtractor(**kwargs)
        # Set the window directly: chunk_length is whole seconds, a tiny model's window may not be.
        fe.n_samples = window
        fe.nb_max_frames = window // hop
        self.extractor = fe
        self.window = window
        self.stride = 2 * hop  # the encoder's second conv has stride 2
        self.normalize = False

    @property
    def frame_rate(self) -> float:
        return self.config.sample_rate / self.stride

    def train(self, mode: bool = True) -> "SemanticTeacher":
        return super().train(False)  # always frozen: no dropout, no feature masking

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher-rate features [B, D, ceil(N / stride)] of audio x [B, N] at the teacher's rate."""
        n = x.shape[-1]
        frames = -(-n // self.stride)
        if self.kind == "whisper":
            return self._whisper_hidden(x, frames)
        if self.normalize:
            x = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-7)
        pad_total = self.receptive_field - self.stride + (frames * self.stride - n)
        left = (self.receptive_field - self.stride) // 2
        x = F.pad(x, (left, pad_total - left))
        out = self.model(x, output_hidden_states=True)
        return out.hidden_states[self.layer].transpose(1, 2)[..., :frames]

    def _whisper_hidden(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        pieces = []
        for start in range(0, x.shape[-1], self.window):
            chunk = x[:, start: start + self.window]
            mel = self.extractor([c.cpu().double().numpy() for c in chunk], sampling_rate=self.config.sample_rate,
                                 return_tensors="pt").input_features
            dtype = next(self.model.parameters()).dtype
            out = self.model(mel.to(self._device(), dtype), output_hidden_states=True)
            pieces.append(out.hidden_states[self.layer][:, : -(-chunk.shape[-1] // self.stride)].transpose(1, 2))
        return torch.cat(pieces, dim=-1)[..., :frames]

    @torch.no_grad()
    def features(self, wav: torch.Tensor, frame_rate: float, sample_rate: int | None = None,
                 num_frames: int | None = None) -> torch.Tensor:
        """Features [B, D, T] of layer `layer` for audio wav [B, 1, N] (at `sample_rate`, default the
        teacher's), at `frame_rate` frames per second: T = num_frames or ceil(N * frame_rate / sample_rate)."""
        from ..audio import resample

        sample_rate = sample_rate or self.config.sample_rate
        if num_frames is None:
            num_frames = math.ceil(wav.shape[-1] * frame_rate / sample_rate - 1e-9)
        x = wav.reshape(wav.shape[0], -1).float().to(self._device())
        if sample_rate != self.config.sample_rate:
            x = resample(x, sample_rate, self.config.sample_rate)
        h = self._hidden(x).float()
        return match_frames(h, num_frames)


def match_frames(h: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Bring features [B, D, T] to exactly `num_frames` frames: average pooling when there are more (the
    teacher runs faster than the codec), linear interpolation when there are fewer."""
    t = h.shape[-1]
    if t == num_frames:
        return h
    if t > num_frames:
        return F.adaptive_avg_pool1d(h, num_frames)
    return F.interpolate(h, size=num_frames, mode="linear", align_corners=False)


def build_teacher(config: TeacherConfig | dict | None) -> SemanticTeacher:
    """A frozen teacher from a `teacher:` config section (one-line ConfigError when it cannot be built)."""
    from ..config import from_dict

    if config is None:
        config = TeacherConfig()
    if isinstance(config, dict):
        config = from_dict(TeacherConfig, config, "teacher")
    if not config.configured:
        raise ConfigError("this model trains against a semantic teacher: set teacher.source (hub id or local "
                          "folder) or teacher.tiny (a transformers config for a random tiny teacher)")
    return SemanticTeacher(config)
