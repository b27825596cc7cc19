"""Codec artefacts: one `.safetensors` file holding the weights and, in its metadata, the config.

Everywhere a model is named (`--model M`), M is one of
  * `default`: the pretrained model shipped inside the package (`neurocodec/weights/default.safetensors`,
    trained by `scripts/train_default_model.sh`); every command uses it when no model is named;
  * a checkpoint path (`*.safetensors`, written by `save_codec` or exported by training);
  * a config name or path, optionally with a size preset: `grvq_4cb`, `configs/fsq.yaml`, `grvq_4cb:tiny`.
    The model is then initialised from the config's seed, so two processes naming the same config get
    the same weights (tests and benchmarks rely on it). EMA codebooks of such a model are initialised by
    k-means on the encoder's output for fixed pseudo-random audio, so that its codes are spread out
    like a trained model's rather than all zero.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import DEFAULT_MODEL, ConfigError, load_config, split_model_spec
from ..errors import UserError
from .model import CodecConfig
from .registry import Family, families, family_of, get_family
from .widen import widen_codec, widened_channels

FORMAT = "neurocodec.codec.v1"
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "weights" / "default.safetensors"


def build_codec(model_config: dict | CodecConfig, sync_codebook: bool = False, name: str | None = None) -> torch.nn.Module:
    """A freshly initialised codec (deterministic: seeded from the config) for training or inference."""
    config = model_config if isinstance(model_config, CodecConfig) else CodecConfig.from_dict(model_config)
    family = get_family(config.family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        codec = family.codec_class(config, sync_codebook=sync_codebook)
    codec._name = name or config.family
    return codec


@torch.no_grad()
def warm_start_codebooks(codec: torch.nn.Module) -> None:
    """Run k-means codebook init (the quantizer's own, in training mode) on fixed pseudo-random audio.

    Enough audio for a few more frames than the largest codebook has entries (k-means otherwise samples
    duplicate centroids), and few k-means iterations: this only has to spread the codes out.
    It runs on one thread in float64: k-means is iterative, so float32 rounding that differs with the
    thread count (or the CPU's kernels) would otherwise give different codebooks in different processes,
    and "same config, same weights" would not hold.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(codec.config.seed + 1)
            frames = int(1.1 * max(codec.quantizer.cardinalities)) + 1
            if hasattr(codec, "warm_start_input"):  # a family with its own kind of input (images)
                x = codec.warm_start_input(frames)
            else:
                n = frames * codec.frame_size
                # Noise with a random gain per second: more varied latents than white noise.
                noise = torch.randn(1, 1, n, dtype=torch.float64)
                gains = torch.rand(1, 1, n // codec.sample_rate + 1, dtype=torch.float64)
                gains = gains.repeat_interleave(codec.sample_rate, dim=-1)[..., :n]
                x = 0.1 * gains * noise
            codec.encoder.double()
            codec.quantizer.double()
            codec.quantizer.initialize_codebooks(codec.encoder(x), kmeans_iters=5)
    finally:
        codec.encoder.float()
        codec.quantizer.float()
        torch.set_num_threads(threads)
    codec.eval()


def fold_weight_norm(codec: torch.nn.Module) -> torch.nn.Module:
    """Replace weight-normalised weights by plain ones (same outputs).

    Weight norm helps GAN training; at inference it only costs a norm per conv per call, which is a
    large share of a frame-by-frame streaming step.
    """
    from torch.nn.utils import parametrize

    # Under no_grad (the CLI turns grad off before loading) torch registers the folded weight as a buffer
    # instead of a parameter; keep it a parameter so parameter counts and `.parameters()` stay right.
    with torch.enable_grad():
        for module in codec.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    codec._weight_norm_folded = True
    return codec


def prepare_for_inference(codec: torch.nn.Module, device: str = "cpu") -> torch.nn.Module:
    """Eval mode, weight norm folded, exact (float64) encoding: what every inference path uses."""
    fold_weight_norm(codec)
    codec.to(device).eval()
    codec.set_exact_encoding(True)
    return codec


def config_of(codec: torch.nn.Module) -> dict:
    from ..config import to_dict

    return to_dict(codec.config)


def save_codec(codec: torch.nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write weights + config to `path` atomically (a reader never sees a half-written file)."""
    meta = {"format": FORMAT, "name": codec.name, "config": json.dumps(config_of(codec)),
            "weight_norm_folded": str(bool(getattr(codec, "_weight_norm_folded", False))).lower()}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in codec.state_dict().items()}
    return save_codec_tensors(tensors, meta, path)


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def lineage_steps(meta: dict) -> int:
    """Generator steps behind a codec file, counting those of the models it was fine-tuned from (--init_from):
    training writes `total_steps`; files written before it existed only have their own run's `gen_step`."""
    return int(meta.get("total_steps") or meta.get("gen_step") or 0)


def load_weights_for_training(codec: torch.nn.Module, spec: str | Path) -> dict:
    """Fine-tuning: copy the weights of a codec file (`default`, or a `.safetensors` that training exported)
    into a freshly built training codec with the same network. Returns the file's metadata.

    Only weights move; the run's config (losses, optimiser, quantizer decay, ...) is the run's own. The
    network must be the same (the default model is `grvq_4cb` with `--preset tiny`) or the file's plus blocks that
    start as the identity: a bottleneck, more decoder residual blocks per stage."""
    spec = str(spec)
    family = family_of(codec)
    if spec == DEFAULT_MODEL and family.modality != "audio":
        raise UserError(f"--init_from default: the default model is an audio codec; fine-tune an {family.modality} "
                        f"codec from an {family.modality} codec file that training exported (runs/NAME/codec.safetensors)")
    path = DEFAULT_MODEL_PATH if spec == DEFAULT_MODEL else Path(spec)
    if not path.is_file():
        raise UserError(f"--init_from {spec}: {path} does not exist")
    try:
        meta = read_metadata(path)
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"--init_from {spec}: not a readable safetensors codec ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"--init_from {spec}: not a neurocodec codec file (metadata format={meta.get('format')!r})")
    if meta.get("weight_norm_folded") == "true":
        raise UserError(f"--init_from {spec}: this file was saved for inference (weight norm folded into the weights); "
                        "fine-tune from a file that training exported (runs/NAME/codec.safetensors) or from `default`")
    # Settings that no weight shape reveals but that change what the weights mean.
    theirs = json.loads(meta.get("config", "{}"))
    ours = dataclasses.asdict(codec.config)
    keys = ("family", "sample_rate", "quantizer.kind")
    if ours["quantizer"]["kind"] in ("fsq", "rfsq"):
        keys += ("quantizer.levels",)
    saved_seanet = theirs.get("seanet") or {}
    if max(saved_seanet.get("n_residual_layers", 1), saved_seanet.get("decoder_residual_layers", 0)) > 1:
        keys += ("seanet.dilation_base",)  # the file's second and later residual blocks were trained at its dilations
    for key in keys:
        section, _, field = key.rpartition(".")
        mine = (ours.get(section, {}) if section else ours).get(field)
        saved = (theirs.get(section, {}) if section else theirs).get(field)
        if saved is not None and saved != mine and not (isinstance(mine, (list, tuple)) and list(mine) == saved):
            raise UserError(f"--init_from {spec}: it has model.{key} = {saved}, this config has {mine}; "
                            "fine-tuning keeps the model's settings (for `default`: --config grvq_4cb --preset tiny)")
    own = codec.state_dict()
    if set(state) != set(own) or any(own[k].shape != state[k].shape for k in set(own) & set(state)):
        saved = _file_network(theirs)  # the file's network, to map its weights into a grown one
        if saved is not None and widened_channels(saved, codec):
            state = _widened_state(codec, saved, state, spec)
        elif saved is not None and set(state) != set(own):
            state = _follow_inserted_blocks(codec, saved, state)
    grown = _added_identity_blocks(codec, set(state))
    grown_keys = {f"{prefix}.{key}" for prefix, block in grown.items() for key in block.state_dict()}
    missing = sorted(set(own) - set(state) - grown_keys)
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        detail = "; ".join(f"{what} {names[:3]}" for what, names in
                           (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped)) if names)
        raise UserError(f"--init_from {spec}: its network differs from the one this config builds ({detail}). "
                        f"It was trained from config {meta.get('config_name', '?')!r}; use the same model section "
                        "(for `default`: --config grvq_4cb --preset tiny)")
    codec.load_state_dict(state, strict=not grown)
    for block in grown.values():
        block.start_as_identity()
    if grown:
        kinds = sorted({type(block).__name__ for block in grown.values()})
        print(f"--init_from {spec}: {len(grown)} block(s) are new in this network ({', '.join(kinds)}: "
              f"{', '.join(grown)}); they start as the identity, so the codec starts out computing what the file's "
              "codec computes")
    return meta


def _file_network(saved_config: dict) -> torch.nn.Module | None:
    """The network a codec file's config builds (None where it does not build: the caller's mismatch error says
    what differs)."""
    try:
        return build_codec(saved_config)
    except (UserError, ConfigError, ValueError, TypeError, KeyError):
        return None


def _widened_state(codec: torch.nn.Module, saved: torch.nn.Module, state: dict, spec: str) -> dict:
    """`codec`, the file's network `saved` with more `seanet.channels`, set to compute exactly what the saved
    weights `state` compute (codecs/widen.py); returns its state."""
    try:
        saved.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"--init_from {spec}: its weights do not fit its own config ({str(err)[:200]})") from None
    widen_codec(saved, codec)
    print(f"--init_from {spec}: widened from {saved.config.seanet.channels} to {codec.config.seanet.channels} "
          "SEANet channels; the codec starts out computing what the file's codec computes (codecs/widen.py)")
    return codec.state_dict()


def _follow_inserted_blocks(codec: torch.nn.Module, saved: torch.nn.Module, state: dict) -> dict:
    """Rename the saved weights where `codec` has blocks inserted between the saved network's layers (a deeper
    decoder: `seanet.decoder_residual_layers` above the file's): an `nn.Sequential` names its layers by position,
    so every layer after an insertion moved. Each Sequential of the saved network (built from the file's config)
    is matched in order against ours; a layer of ours that does not match the next saved one must be a block that
    can start as the identity, and is skipped. Anything else is left as it is, for the caller's mismatch error."""
    renames: dict[str, str] = {}
    for name, ours in codec.named_modules():
        theirs = _submodule_or_none(saved, name)
        if not isinstance(ours, torch.nn.Sequential) or not isinstance(theirs, torch.nn.Sequential) \
                or len(ours) <= len(theirs):
            continue
        mapping, i = {}, 0
        for j, layer in enumerate(ours):
            if i < len(theirs) and _same_layer(layer, theirs[i]):
                mapping[i], i = j, i + 1
            elif not hasattr(layer, "start_as_identity"):
                break
        if i == len(theirs):
            prefix = f"{name}." if name else ""
            renames.update({f"{prefix}{a}.": f"{prefix}{b}." for a, b in mapping.items() if a != b})
    if not renames:
        return state
    out = {}
    for key, value in state.items():
        old = next((p for p in renames if key.startswith(p)), None)
        out[renames[old] + key[len(old):] if old else key] = value
    return out


def _submodule_or_none(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _same_layer(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same kind of layer with the same weight names and shapes (what loading a state dict needs)."""
    if type(a) is not type(b):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def _added_identity_blocks(codec: torch.nn.Module, saved_keys: set[str]) -> dict[str, torch.nn.Module]:
    """Blocks of `codec` that the saved weights lack entirely and that can start as the identity (bottlenecks,
    streaming.py; residual blocks, seanet.py: `start_as_identity`): a model can be fine-tuned with some added,
    from its own function."""
    found = {}
    for prefix, module in codec.named_modules():
        if not hasattr(module, "start_as_identity") or any(prefix.startswith(p + ".") for p in found):
            continue
        keys = {f"{prefix}.{key}" for key in module.state_dict()}
        if keys and not keys & saved_keys:
            found[prefix] = module
    return found


def load_checkpoint(path: str | Path, device: str = "cpu") -> torch.nn.Module:
    path = Path(path)
    try:
        meta = read_metadata(path)
        state = load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors checkpoint ({err})") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: not a neurocodec codec checkpoint (metadata format={meta.get('format')!r})")
    codec = build_codec(json.loads(meta["config"]), name=meta.get("name"))
    if meta.get("weight_norm_folded") == "true":
        fold_weight_norm(codec)
    missing, unexpected = codec.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return prepare_for_inference(codec, device)


def load_codec(spec: str | Path, device: str = "cpu") -> torch.nn.Module:
    """Resolve `--model` (`default`, a checkpoint path, or a config name/path with optional `:preset`) to a
    codec ready for inference: eval mode, weight norm folded."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        if not DEFAULT_MODEL_PATH.is_file():
            raise UserError(f"the default model is not installed ({DEFAULT_MODEL_PATH} is missing); "
                            "name a checkpoint or a config with --model")
        codec = load_checkpoint(DEFAULT_MODEL_PATH, device)
        codec._name = DEFAULT_MODEL
        return codec
    if spec.endswith(".safetensors") or (Path(spec).is_file() and Path(spec).suffix not in (".yaml", ".yml")):
        if not Path(spec).is_file():
            raise UserError(f"checkpoint {spec} does not exist")
        return load_checkpoint(spec, device)
    name, preset = split_model_spec(spec)
    config = load_config(name, preset)
    if "model" not in config:
        raise ConfigError(f"config {name} has no 'model' section")
    label = config["name"] + (f":{preset}" if preset else "")
    codec = build_codec(config["model"], name=label)
    warm_start_codebooks(codec)
    return prepare_for_inference(codec, device)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, shapes, values): identifies config-only models too.

    Floating tensors are hashed as float32, so the hash does not depend on the precision the codec runs
    its inference in (exact encoding keeps the encoder in float64; its weights are float32 values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.float()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-d tensor (e.g. BatchNorm's num_batches_tracked) cannot be viewed as bytes
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def family_of_spec(spec: str | Path) -> Family | None:
    """The family a `--model` spec (config name/path with preset, or codec file) names, read without building the
    model; None when the spec cannot be read (the normal loading path then reports the real error)."""
    spec = str(spec)
    try:
        if spec.endswith(".safetensors") or (Path(spec).is_file() and Path(spec).suffix not in (".yaml", ".yml")):
            name = json.loads(read_metadata(spec).get("config", "{}")).get("family", "seanet")
        else:
            config_name, preset = split_model_spec(spec)
            name = (load_config(config_name, preset).get("model") or {}).get("family", "seanet")
    except Exception:  # noqa: BLE001 (see the docstring)
        return None
    return families().get(name)


QUANTIZER_PREFIX = "quantizer."  # every family keeps its codebooks in `codec.quantizer`


def average_codec_files(specs: list[str], weights: list[float] | None = None, codebooks_from: int | None = None,
                        average_codebooks: bool = False) -> tuple[dict, dict]:
    """Weighted average of codec files of one network: returns (tensors, metadata) for `save_file`.

    Why: fine-tunes of one model (other seeds, other steps) average into a model that usually keeps what they
    share and loses what is one run's noise ("model soups", Wortsman et al. 2022), and an average with the model
    they started from trades a fine-tune's gains against its start (WiSE-FT, Wortsman et al. 2022). Only files
    of the same config (same names and shapes) average; floating tensors are averaged as stored (weight-norm
    files: g and v separately, as an optimiser sees them); any other tensor (a codebook's `initted` flag) must
    be equal in every file. `weights` are relative (normalised to sum to 1); default: uniform.

    Codebooks are the exception: EMA codebooks with dead-code expiry are re-drawn as they train, so the entries of
    two fine-tunes are unrelated (day 26: 88-95% of the entries of two 4,000-step runs from one model differed by
    more than half their norm) and their mean is no codebook at all (that average lost 0.17 PESQ-WB on a speaker
    where both inputs lost at most 0.06). So the quantizer's tensors are copied from one input (`codebooks_from`,
    an index into `specs`); where they differ and no input is named, the files are refused unless
    `average_codebooks`."""
    if len(specs) < 2:
        raise UserError("averaging needs at least two codec files")
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(specs):
        raise UserError(f"{len(weights)} weights for {len(specs)} files")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"weights must be non-negative with a positive sum, got {weights}")
    weights = [w / sum(weights) for w in weights]
    files = [DEFAULT_MODEL_PATH if str(s) == DEFAULT_MODEL else Path(s) for s in specs]
    metas, states = [], []
    for spec, path in zip(specs, files):
        try:
            metas.append(read_metadata(path))
            states.append(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{spec}: not a readable safetensors codec file ({err})") from None
        if metas[-1].get("format") != FORMAT:
            raise UserError(f"{spec}: not a neurocodec codec file (metadata format={metas[-1].get('format')!r})")
    first = metas[0]
    for spec, meta, state in zip(specs[1:], metas[1:], states[1:]):
        # compared resolved (defaults filled in): a file written before an option existed lacks its key
        if CodecConfig.from_dict(json.loads(meta["config"])) != CodecConfig.from_dict(json.loads(first["config"])):
            raise UserError(f"{spec} and {specs[0]} have different configs: only one network's files average")
        if meta.get("weight_norm_folded") != first.get("weight_norm_folded"):
            raise UserError(f"{spec} and {specs[0]}: one has weight norm folded, the other not")
        if state.keys() != states[0].keys():
            raise UserError(f"{spec} and {specs[0]} hold different tensors "
                            f"(e.g. {sorted(state.keys() ^ states[0].keys())[:3]})")
    if codebooks_from is not None and not 0 <= codebooks_from < len(specs):
        raise UserError(f"codebooks from input {codebooks_from + 1}: there are {len(specs)} inputs")
    codebook_names = [n for n in states[0] if n.startswith(QUANTIZER_PREFIX) and states[0][n].is_floating_point()]
    differing = [n for n in codebook_names if any(not torch.equal(s[n], states[0][n]) for s in states[1:])]
    if differing and codebooks_from is None and not average_codebooks:
        raise UserError(f"the inputs' codebooks differ ({len(differing)} quantizer tensors, e.g. {differing[0]}); "
                        "averaging unrelated codebook entries breaks the codec: name the input whose codebooks to "
                        "keep (--codebooks-from N), or average them anyway (--average-codebooks)")
    averaged = {}
    for name, ref in states[0].items():
        if codebooks_from is not None and name.startswith(QUANTIZER_PREFIX):
            averaged[name] = states[codebooks_from][name].clone()
            continue
        if not ref.is_floating_point():
            if any(not torch.equal(state[name], ref) for state in states[1:]):
                raise UserError(f"tensor {name} ({ref.dtype}) differs between the files and cannot be averaged")
            averaged[name] = ref.clone()
            continue
        total = torch.zeros_like(ref, dtype=torch.float64)
        for w, state in zip(weights, states):
            total += w * state[name].double()
        averaged[name] = total.to(ref.dtype).contiguous()
    sources = [{"file": str(spec), "sha256": file_sha256(path), "weight": round(w, 6), "total_steps": lineage_steps(m)}
               for spec, path, w, m in zip(specs, files, weights, metas)]
    meta = {"format": FORMAT, "name": first.get("name", "average"), "config": first["config"],
            "weight_norm_folded": first.get("weight_norm_folded", "false"),
            "config_name": first.get("config_name", ""), "averaged_from": json.dumps(sources),
            "codebooks": "averaged" if codebooks_from is None else f"from {specs[codebooks_from]}",
            # the longest lineage among the inputs: what `lineage_steps` reports for the average
            "total_steps": str(max(s["total_steps"] for s in sources))}
    return averaged, meta


def save_codec_tensors(tensors: dict, metadata: dict, path: str | Path) -> Path:
    """Write tensors + metadata to `path` atomically (as `save_codec`, for tensors that are not a module's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path
