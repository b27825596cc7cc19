"""The GPU kit: continue the default model's training run (scripts/train_default_model.sh) on a lent GPU
machine that has no network, and bring the result back.

    python scripts/gpukit.py build   [--kit .gpukit]          # here: wheels, corpus, run config (scripts/gpu_kit.sh)
    python scripts/gpukit.py check                            # device: python, torch, GPU, every kit import
    python scripts/gpukit.py corpus  --out /tmp/corpus        # device: unpack the corpus (Opus + FLAC, manifest)
    python scripts/gpukit.py resume  --run runs/default-model-gpu  # device: step of the device's own checkpoint
    python scripts/gpukit.py report  --start-step N ...       # device: steps/s, files into $OUT
    python scripts/gpukit.py collect DIR                      # here: returned checkpoint + metrics into the run

The device machine (docs/default_model/GPU.md) has Python 3.12 and torch but not our audio/VQ packages, and
everything it gets travels inside the repository copy (64 MiB in all). So the kit holds cp312 wheels of the
missing packages, the run's training files re-encoded as Opus with its exact validation crops (one tar; see
OPUS_LEVEL), and the config of a run of the recipe. The device fine-tunes the shipped weights (`--init_from
default`, in the repository copy) with that config, as a CPU session of scripts/train_default_model.sh does; the
run's own checkpoint (18 MiB with optimiser and discriminator states, 13 MiB as xz) no longer fits beside the
wider corpus. Calls on a warm machine continue the device's own checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KIT = Path(".gpukit")
RUN = Path("runs/default-model-lstm")  # the recipe's run (scripts/train_default_model.sh): its config travels
GPU_RUN = Path("runs/default-model-gpu")  # the device's run, and where collect puts it here
SIZE_LIMIT = 64 * 2**20  # what may travel to the device: working tree + carried paths
SIZE_MARGIN = 3 * 2**20  # room for files others add to the tree before the call

# Packages training imports (train/fit.py -> neurocodec.train/codecs/data, eval.metrics) that the device
# image lacks, with what pulls them in; versions are those of our .venv (= pyproject.toml's pins).
KIT_PACKAGES = {
    "vector-quantize-pytorch": "the quantizers",
    "einx": "vector-quantize-pytorch",
    "torch-einops-utils": "vector-quantize-pytorch",
    "frozendict": "einx",
    "loguru": "vector-quantize-pytorch",
    "einops": "vector-quantize-pytorch (>= 0.8.1; the image's version is not known)",
    "soundfile": "reading the Opus / FLAC corpus",
    "cffi": "soundfile",
    "pycparser": "cffi",
    "pesq": "validation PESQ (no binary wheel on PyPI: built here with CPython 3.12)",
    "pystoi": "validation STOI",
    "torch-pesq": "the recipe's PESQ loss (loss.pesq, day 22)",
    "torchtyping": "torch-pesq",
    "typeguard": "torchtyping (< 3)",
}
# The device image's Python packages (docs/default_model/GPU.md), with the versions that were read there.
DEVICE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
DEVICE_VERSIONS = {"torch": "2.11.0", "torchaudio": "2.11.0", "numpy": "2.5.2", "lightning": "2.6.6",
                   "pytorch-lightning": "2.6.6", "safetensors": "0.8.0", "torchmetrics": "1.9.0"}
DEVICE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
              "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
DOWNLOAD_PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                      "manylinux2014_x86_64", "manylinux1_x86_64"]
DEVICE_MAX_GLIBC = (2, 35)  # Ubuntu 24.04 (Python 3.12.3) has 2.39; stay below to be safe

# The corpus travels as the run's own manifest, re-encoded: training files as Ogg Opus at libsndfile's compression
# level 0.96 (about 22 kbit/s over our corpus, the Ogg headers of its many short files included; PESQ-WB 3.9
# against the originals on 16 training clips, 2026-12-06), where the 2 kbps codec itself reaches 1.4-1.9 on
# held-out voices, so the coding noise is far below what the model can reproduce. FLAC of the wider corpus (3.6 h
# of training speech) would take ~180 MB, Debian's own files ~117 MB; both exceed the 64 MiB that travel.
# Validation crops travel as the exact tensors the CPU run validates on (24-bit FLAC): the device's PESQ curve
# continues the CPU run's.
OPUS_LEVEL = 0.96


def log(msg: str) -> None:
    print(msg, flush=True)


def canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


# ---------------------------------------------------------------------------------------------------------
# wheels
# ---------------------------------------------------------------------------------------------------------
def device_tags() -> set:
    from packaging import tags

    platforms = ([f"manylinux_2_{n}_x86_64" for n in range(DEVICE_MAX_GLIBC[1], 4, -1)]
                 + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"])
    out = set(tags.cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=platforms))
    out |= set(tags.compatible_tags((3, 12), interpreter="cp312", platforms=platforms))
    return out


def wheel_info(path: Path) -> dict:
    """Name, version, tags and install requirements (marker-filtered for the device) of one wheel file."""
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    requires = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(DEVICE_ENV):
                requires.append(req)
    return {"name": str(name), "version": str(version), "tags": set(tags), "requires": requires, "file": path.name}


def check_wheels(wheel_dir: Path) -> list[str]:
    """Problems that would stop the install or the imports on the device (empty list: none)."""
    problems = []
    infos = [wheel_info(p) for p in sorted(wheel_dir.glob("*.whl"))]
    by_name: dict[str, list[dict]] = {}
    for info in infos:
        by_name.setdefault(info["name"], []).append(info)
    for name, group in by_name.items():
        if len(group) > 1:
            problems.append(f"{name}: {len(group)} wheels ({', '.join(i['file'] for i in group)}); keep one")
    ok_tags = device_tags()
    for info in infos:
        if not info["tags"] & ok_tags:
            problems.append(f"{info['file']}: no tag installable by CPython 3.12 on manylinux x86_64")
    for name in KIT_PACKAGES:
        if canonical(name) not in by_name:
            problems.append(f"{name}: no wheel in {wheel_dir}")
    for info in infos:
        for req in info["requires"]:
            dep = canonical(req.name)
            if dep in by_name:
                have = by_name[dep][0]["version"]
            elif dep in DEVICE_PACKAGES:
                have = DEVICE_VERSIONS.get(dep)
            else:
                problems.append(f"{info['file']} needs {req}: neither in the kit nor on the device")
                continue
            if have is not None and req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{info['file']} needs {req}, the kit/device has {have}")
    return problems


def find_python312() -> str | None:
    """A CPython 3.12 here, to build wheels PyPI has only as source (pesq)."""
    candidates = [os.environ.get("PY312"), shutil.which("python3.12")]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))
    for c in candidates:
        if not c:
            continue
        out = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == "True":
            return c
    return None


def fetch_wheels(wheel_dir: Path) -> None:
    from importlib.metadata import version

    wheel_dir.mkdir(parents=True, exist_ok=True)
    present = {}
    for p in wheel_dir.glob("*.whl"):
        info = wheel_info(p)
        present.setdefault(info["name"], []).append((info["version"], p))
    for name in KIT_PACKAGES:
        want = version(name)
        have = present.get(canonical(name), [])
        for v, p in have:
            if v != want:  # one version of each: two stop the whole install on the device
                p.unlink()
        if any(v == want for v, _ in have):
            continue
        spec = f"{name}=={want}"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "-d", str(wheel_dir)]
        for plat in DOWNLOAD_PLATFORMS:
            cmd += ["--platform", plat]
        out = subprocess.run(cmd + [spec], capture_output=True, text=True)
        if out.returncode == 0:
            log(f"  downloaded {spec}")
            continue
        py312 = find_python312()  # no binary wheel for cp312 (pesq): build one with a local CPython 3.12
        if py312 is None:
            raise SystemExit(f"gpukit: no cp312 wheel of {spec} on the registry and no python3.12 here to build "
                             f"one (set PY312=/path/to/python3.12)")
        log(f"  building {spec} with {py312} (no binary wheel on the registry)")
        out = subprocess.run([py312, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), spec],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"gpukit: building {spec} failed:\n{out.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------------------
def run_data(config_path: Path):
    """(data config, sample rate, frame size, seed) of a run's saved config.yaml, as fit.py would build them."""
    from neurocodec.codecs.checkpoint import build_codec
    from neurocodec.train.fit import FitArgs, resolve_config

    config = resolve_config(FitArgs(config=str(config_path)))
    codec = build_codec(config.model)
    return config.data, codec.sample_rate, codec.frame_size, config.trainer.seed


def validation_set(data, sample_rate: int, frame_size: int, seed: int):
    """The run's validation crops, built by the training data module itself (the same tensors fit.py scores)."""
    from neurocodec.train.datamodule import CodecDataModule

    module = CodecDataModule(data, sample_rate, frame_size, seed=seed)
    module.setup()
    return module.valid_set


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def write_corpus(path: Path, config_path: Path, manifest: Path) -> dict:
    """The kit's corpus.tar (written atomically): `manifest.jsonl`, `train/NNNNNN.opus` for every training file
    of `manifest` (mono, the model's rate), `valid/NNN.flac` for every validation crop of the run's config.
    The device trains on it with `--data.manifest <unpacked>/manifest.jsonl`: each validation file is exactly one
    crop long, so the config's own `valid_items` takes them all, in order."""
    import soundfile as sf
    from tqdm import tqdm

    from neurocodec.audio import load_audio
    from neurocodec.data.manifest import read_manifest

    data, sr, frame_size, seed = run_data(config_path)
    data.manifest = str(manifest)
    valid = validation_set(data, sr, frame_size, seed)
    train = read_manifest(manifest, split=data.train_split)
    lines, seconds = [], 0.0
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for k, utt in enumerate(tqdm(train, desc="training files -> Opus", unit="file")):
            wav = load_audio(utt.path, sr)[0].numpy()
            buf = io.BytesIO()
            sf.write(buf, wav, sr, format="OGG", subtype="OPUS", compression_level=OPUS_LEVEL)
            name = f"train/{k:06d}.opus"
            _add(tar, name, buf.getvalue())
            seconds += wav.size / sr
            lines.append({"id": utt.id, "path": name, "speaker": utt.speaker, "split": "train"})
        for k in range(len(valid)):
            buf = io.BytesIO()
            sf.write(buf, valid[k][0].numpy(), sr, format="FLAC", subtype="PCM_24")
            name = f"valid/{k:03d}.flac"
            _add(tar, name, buf.getvalue())
            lines.append({"id": f"valid_{k:03d}", "path": name, "speaker": "valid", "split": "valid"})
        _add(tar, "manifest.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())
    tmp.replace(path)
    return {"train_files": len(train), "train_hours": round(seconds / 3600, 3), "valid_crops": len(valid),
            "source_manifest": str(manifest), "opus_level": OPUS_LEVEL}


def cmd_corpus(args) -> int:
    """Device: unpack the kit's corpus.tar (a warm machine keeps it from the call before)."""
    kit, out = Path(args.kit), Path(args.out)
    meta = json.loads((kit / "kit.json").read_text())
    stamp = out / "corpus.sha256"
    t0 = time.time()
    if not (stamp.is_file() and stamp.read_text() == meta["corpus"]["sha256"]):
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(kit / "corpus.tar", "r") as tar:
            tar.extractall(out, filter="data")
        stamp.write_text(meta["corpus"]["sha256"])
    c = meta["corpus"]
    log(f"corpus {out}: {c['train_files']} training files ({c['train_hours']:.2f} h, Opus), {c['valid_crops']} "
        f"validation crops, in {time.time() - t0:.0f} s")
    return 0


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
def checkpoint_step(data: bytes | Path) -> int:
    """Generator step of a Lightning checkpoint of our trainer (loaded on the CPU)."""
    import torch

    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    extra = ckpt.get("neurocodec") or {}
    if "gen_step" in extra:
        return int(extra["gen_step"])
    return int(ckpt["state_dict"]["gen_step"])


def without_timer_state(data: bytes) -> bytes:
    """The checkpoint without Lightning's Timer state. A run stopped by --trainer.max_time saves the time it
    used, and a resume with the same max_time would then stop at once (seen in the dry run): each call's
    max_time must count from that call's start, and a CPU run resumed from the result must not inherit it."""
    import torch

    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if "Timer" not in (ckpt.get("callbacks") or {}):
        return data
    del ckpt["callbacks"]["Timer"]
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def cmd_resume(args) -> int:
    """Device: the generator step of the device's own checkpoint (a warm machine keeps runs/ between calls), its
    Timer state dropped so that this call's max_time counts from now; 0 where there is none (the call then
    starts from the shipped weights)."""
    last = Path(args.run) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        print("resume: no checkpoint on the device; fine-tuning the shipped weights (--init_from default)",
              file=sys.stderr)
        print(0)
        return 0
    data = last.read_bytes()
    clean = without_timer_state(data)
    if clean is not data:
        write_atomic(last, clean)
    step = checkpoint_step(clean)
    print(f"resume: the device's own {last} (step {step})", file=sys.stderr)
    print(step)
    return 0


# ---------------------------------------------------------------------------------------------------------
# build (here)
# ---------------------------------------------------------------------------------------------------------
def travelling_bytes(root: Path, skip: Path) -> int:
    """Bytes of what a device call sends besides the carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True)
    total = 0
    for name in set(out.stdout.decode().split("\0")):
        p = root / name
        if name and p.is_file() and not p.is_symlink() and skip not in p.parents:
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def ensure_excluded(root: Path, entry: str) -> None:
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if entry not in lines:
        exclude.write_text("\n".join([*lines, entry]) + "\n")


def cmd_build(args) -> int:
    from neurocodec.codecs.checkpoint import file_sha256

    kit, run = ROOT / args.kit, ROOT / args.run
    if not (run / "config.yaml").is_file():
        raise SystemExit(f"gpukit: no {show(run / 'config.yaml')}: name a run of the recipe whose config the device "
                         f"should follow, --run runs/NAME")
    ensure_excluded(ROOT, f"/{args.kit.strip('/')}/")
    kit.mkdir(parents=True, exist_ok=True)

    log("[1/4] wheels (cp312, manylinux x86_64) of the packages the device lacks")
    fetch_wheels(kit / "wheels")
    problems = check_wheels(kit / "wheels")
    if problems:
        raise SystemExit("gpukit: the wheels would not install on the device:\n  " + "\n  ".join(problems))
    for info in sorted((wheel_info(p) for p in (kit / "wheels").glob("*.whl")), key=lambda i: i["name"]):
        log(f"  {info['file']}")
    log("  tags and requirements: every requirement is in the kit or on the device")

    log("[2/4] corpus: the run's training files as Opus, its validation crops as they are")
    corpus = kit / "corpus.tar"
    manifest = Path(args.manifest) if args.manifest else None
    if manifest is None:
        data, *_ = run_data(run / "config.yaml")
        manifest = Path(data.manifest)
    source = {"source_manifest": str(manifest), "source_sha256": file_sha256(manifest),
              "config_sha256": file_sha256(run / "config.yaml")}
    old = json.loads((kit / "kit.json").read_text()).get("corpus", {}) if (kit / "kit.json").is_file() else {}
    if args.rebuild_corpus or not corpus.is_file() or any(old.get(k) != v for k, v in source.items()):
        corpus_info = {**write_corpus(corpus, run / "config.yaml", manifest), **source}
    else:
        corpus_info = old
    corpus_info["sha256"] = file_sha256(corpus)
    log(f"  {manifest}: {corpus_info['train_files']} training files ({corpus_info['train_hours']:.2f} h) and "
        f"{corpus_info['valid_crops']} validation crops -> {corpus.stat().st_size / 2**20:.1f} MiB")

    log("[3/4] the run's config (the recipe the device follows) and the weights it starts from")
    shutil.copyfile(run / "config.yaml", kit / "config.yaml")
    from neurocodec.codecs.checkpoint import DEFAULT_MODEL_PATH, lineage_steps, read_metadata

    shipped = lineage_steps(read_metadata(DEFAULT_MODEL_PATH))
    log(f"  {run / 'config.yaml'}; the device starts from the shipped weights (step {shipped}, in the tree)")

    meta = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip(),
        "run": str(args.run),
        "init_from": {"model": "default", "lineage_steps": shipped, "sha256": file_sha256(DEFAULT_MODEL_PATH)},
        "corpus": corpus_info,
        "wheels": sorted(p.name for p in (kit / "wheels").glob("*.whl")),
    }
    (kit / "kit.json").write_text(json.dumps(meta, indent=2) + "\n")

    log("[4/4] size of what travels")
    tree = travelling_bytes(ROOT, kit)
    kit_size = dir_bytes(kit)
    total = tree + kit_size
    log(f"  kit {kit_size / 2**20:.1f} MiB (wheels {dir_bytes(kit / 'wheels') / 2**20:.1f}, corpus "
        f"{corpus.stat().st_size / 2**20:.1f}) "
        f"+ working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of {SIZE_LIMIT / 2**20:.0f} MiB")
    if total > SIZE_LIMIT - SIZE_MARGIN:
        raise SystemExit(f"gpukit: {total / 2**20:.1f} MiB is over the device's {SIZE_LIMIT / 2**20:.0f} MiB "
                         f"(less a {SIZE_MARGIN / 2**20:.0f} MiB margin): drop untracked files from the tree")
    log(f"kit ready: {args.kit} (from the shipped step {shipped}); device call: see docs/default_model/GPU.md")
    return 0


# ---------------------------------------------------------------------------------------------------------
# device: check and report
# ---------------------------------------------------------------------------------------------------------
def cmd_check(args) -> int:
    import importlib

    import torch

    log(f"python {platform.python_version()}, torch {torch.__version__}, cuda "
        f"{torch.version.cuda}, GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    bad = []
    for module in ("vector_quantize_pytorch", "soundfile", "pesq", "pystoi", "lightning", "tensorboard",
                   "neurocodec.train.fit", "neurocodec.train.module"):
        try:
            importlib.import_module(module)
        except Exception as err:  # report every failure, then stop before the long steps
            bad.append(f"{module}: {type(err).__name__}: {err}")
    import neurocodec

    log(f"neurocodec from {', '.join(neurocodec.__path__)}")  # a namespace package: no __file__
    if bad:
        log("imports that fail:\n  " + "\n  ".join(bad))
        return 1
    if args.require_gpu and not torch.cuda.is_available():
        log("no CUDA device")
        return 1
    return 0


def tb_rate(tb_dir: Path, since: float) -> tuple[float, int, float] | None:
    """(steps/s, steps, seconds) between the first and last `gen_step` logged to TensorBoard after `since`:
    the sustained training rate, validations included, startup excluded."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    points = []
    for events in sorted(tb_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if "gen_step" in acc.Tags().get("scalars", []):
            points += [(e.wall_time, e.value) for e in acc.Scalars("gen_step") if e.wall_time >= since]
    if len(points) < 2:
        return None
    points.sort()
    seconds = points[-1][0] - points[0][0]
    steps = int(points[-1][1] - points[0][1])
    return (steps / seconds if seconds > 0 else float("nan")), steps, seconds


def cmd_report(args) -> int:
    """Device: steps/s of this call and the files to bring back, into $OUT (at most 8 files)."""
    import torch

    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    last = run / "checkpoints" / "last.ckpt"
    end = checkpoint_step(last) if last.is_file() else args.start_step
    steps = end - args.start_step
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    rate = tb_rate(run / "tb", args.fit_start)
    meta = json.loads((Path(args.kit) / "kit.json").read_text())
    record = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "start_step": args.start_step, "end_step": end, "steps": steps,
        "fit_seconds": round(args.fit_seconds, 1), "max_time": args.max_time,
        "steps_per_s_overall": round(steps / args.fit_seconds, 3) if args.fit_seconds > 0 else None,
        "steps_per_s_sustained": round(rate[0], 3) if rate else None,
        "fit_rc": args.fit_rc, "kit_created": meta["created"], "kit_git_head": meta["git_head"],
        "init_from": meta["init_from"],
        "metrics": summary.get("metrics", {}),
    }
    (out / "gpu_run.json").write_text(json.dumps(record, indent=2) + "\n")
    for src, name in ((last, "last.ckpt"), (run / "csv" / "metrics.csv", "metrics.csv"),
                      (run / "codec.safetensors", "codec.safetensors"), (run / "summary.json", "summary.json"),
                      (run / "config.yaml", "config.yaml")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    pesq = record["metrics"].get("valid/pesq")
    log(f"\n{record['device']}: generator steps {args.start_step} -> {end} ({steps} steps) in {args.fit_seconds:.0f} s "
        f"of fit.py: {record['steps_per_s_overall']} steps/s overall"
        + (f", {rate[0]:.2f} steps/s sustained ({rate[1]} steps in {rate[2]:.0f} s, startup excluded)" if rate else "")
        + (f"; last validation PESQ-WB {pesq:.3f}" if pesq is not None else ""))
    log(f"files for the way back: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if steps > 0 and args.fit_rc == 0 else 1


# ---------------------------------------------------------------------------------------------------------
# collect (here)
# ---------------------------------------------------------------------------------------------------------
def read_csv_rows(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


def merge_metrics(local: Path, device: Path) -> tuple[int, int]:
    """Append the device's CSV rows to the run's; local rows from its first step on are dropped (they belong
    to a CPU continuation that the GPU checkpoint replaces, or to an earlier collect of the same rows).
    Rows are keyed by Lightning's `step`, which every row has. Returns (rows kept, rows added)."""
    lkeys, lrows = read_csv_rows(local)
    dkeys, drows = read_csv_rows(device)
    if not drows:
        return len(lrows), 0
    first = min(s for s in map(_step, drows) if s == s)
    kept = [r for r in lrows if not _step(r) >= first]
    keys = lkeys + [k for k in dkeys if k not in lkeys]
    tmp = local.with_name(local.name + ".tmp")
    local.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows(drows)
    os.replace(tmp, local)
    return len(kept), len(drows)


def running_trainings(run: Path) -> list[str]:
    """fit.py processes whose run folder is `run` (they would overwrite its last.ckpt): the folder comes from
    --trainer.root_dir/--trainer.run_name or --ckpt_path, relative to the process's working directory."""
    run = run.resolve()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = [a.decode(errors="replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
            cwd = Path(os.readlink(proc / "cwd"))
        except OSError:
            continue
        if not any(a.endswith("fit.py") for a in argv):
            continue
        opts = {}
        for i, a in enumerate(argv):
            key, eq, value = a.partition("=")
            if key.startswith("--"):
                opts[key[2:]] = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        dirs = []
        if "trainer.run_name" in opts:
            dirs.append(cwd / opts.get("trainer.root_dir", "runs") / opts["trainer.run_name"])
        if "ckpt_path" in opts:
            ckpt = cwd / opts["ckpt_path"]
            dirs.append(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
        if any(d.resolve() == run for d in dirs):
            found.append(f"pid {proc.name}: {' '.join(argv)[:160]}")
    return found


def show(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def cmd_collect(args) -> int:
    src, run = Path(args.dir), ROOT / args.run
    record = json.loads((src / "gpu_run.json").read_text())
    ckpt = (src / "last.ckpt").read_bytes()
    end = checkpoint_step(ckpt)  # also proves it loads on a CPU-only machine
    last = run / "checkpoints" / "last.ckpt"
    local = checkpoint_step(last) if last.is_file() else -1
    busy = running_trainings(run)
    if busy and not args.force:
        raise SystemExit("gpukit: a training writes into " + str(run) + " (it would overwrite last.ckpt at its next "
                         "checkpoint); stop it first, collect, then restart scripts/train_default_model.sh:\n  "
                         + "\n  ".join(busy))
    if local >= end and not args.force:
        raise SystemExit(f"gpukit: {last} is at step {local}, not behind the returned step {end}; nothing done "
                         f"(--force replaces it anyway)")
    if local > record["start_step"]:
        log(f"note: the local run went on to step {local} after the kit was made (step {record['start_step']}); "
            f"the GPU run reached {end}, so the local steps after {record['start_step']} are set aside")
    if last.is_file():
        backup = last.with_name(f"pre-gpu-step{local:07d}.ckpt.bak")
        shutil.copyfile(last, backup)
        log(f"kept the previous checkpoint as {show(backup)}")
    write_atomic(last, without_timer_state(ckpt))
    if (src / "codec.safetensors").is_file():
        write_atomic(run / "codec.safetensors", (src / "codec.safetensors").read_bytes())
    if not (run / "config.yaml").is_file() and (src / "config.yaml").is_file():  # a new local run folder
        write_atomic(run / "config.yaml", (src / "config.yaml").read_bytes())
    kept, added = merge_metrics(run / "csv" / "metrics.csv", src / "metrics.csv")
    with open(run / "gpu_runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"{show(last)}: step {local if local >= 0 else '(none)'} -> {end} (GPU: {record['device']}, "
        f"{record.get('steps_per_s_sustained') or record.get('steps_per_s_overall')} steps/s); "
        f"metrics.csv: {kept} rows kept + {added} from the device; session logged in "
        f"{show(run / 'gpu_runs.jsonl')}")
    log(f"next: another GPU call on the warm machine, or resume on the CPU (train/fit.py --ckpt_path {show(last)}), "
        f"or ship (python scripts/ship_default_model.py --run {show(run)} --corpus DIR)")
    return 0


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="here: fill the kit folder")
    b.add_argument("--kit", default=str(KIT))
    b.add_argument("--run", default=str(RUN))
    b.add_argument("--manifest", help="corpus to carry (default: the run config's data.manifest)")
    b.add_argument("--rebuild-corpus", action="store_true", help="write corpus.tar again even if up to date")
    b.set_defaults(func=cmd_build)
    c = sub.add_parser("check", help="device: versions, GPU, imports")
    c.add_argument("--require-gpu", action="store_true")
    c.set_defaults(func=cmd_check)
    k = sub.add_parser("corpus", help="device: unpack the corpus (manifest.jsonl, Opus and FLAC files)")
    k.add_argument("--kit", default=str(KIT))
    k.add_argument("--out", default="/tmp/corpus")
    k.set_defaults(func=cmd_corpus)
    r = sub.add_parser("resume", help="device: step of the device's own checkpoint (0: none), Timer state dropped")
    r.add_argument("--run", default=str(GPU_RUN))
    r.set_defaults(func=cmd_resume)
    o = sub.add_parser("report", help="device: steps/s and the files to bring back")
    o.add_argument("--kit", default=str(KIT))
    o.add_argument("--run", default=str(GPU_RUN))
    o.add_argument("--out", required=True)
    o.add_argument("--start-step", type=int, required=True)
    o.add_argument("--fit-start", type=float, required=True, help="epoch seconds when fit.py started")
    o.add_argument("--fit-seconds", type=float, required=True)
    o.add_argument("--fit-rc", type=int, default=0)
    o.add_argument("--max-time", default=None)
    o.set_defaults(func=cmd_report)
    g = sub.add_parser("collect", help="here: install a device call's returned files into the run")
    g.add_argument("dir", help="the folder the device call's files came back to (the run tool's files_at)")
    g.add_argument("--run", default=str(GPU_RUN), help="local run folder (default %(default)s; a fresh one for a "
                   "new device lineage)")
    g.add_argument("--force", action="store_true", help="replace a local checkpoint that is not behind, or "
                   "collect while a training of the run is going")
    g.set_defaults(func=cmd_collect)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
