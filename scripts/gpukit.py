"""The GPU kit: continue the default model's training run (scripts/train_default_model.sh) on a lent GPU
machine that has no network, and bring the result back.

    python scripts/gpukit.py build   [--kit .gpukit]          # here: wheels, corpus, checkpoint (scripts/gpu_kit.sh)
    python scripts/gpukit.py check                            # device: python, torch, GPU, every kit import
    python scripts/gpukit.py corpus  --out /tmp/corpus        # device: unpack the G.722 prompts, build the corpus
    python scripts/gpukit.py resume  --run runs/default-model # device: put the kit's checkpoint in place
    python scripts/gpukit.py report  --start-step N ...       # device: steps/s, files into $OUT
    python scripts/gpukit.py collect DIR                      # here: returned checkpoint + metrics into the run

The device machine (docs/default_model/GPU.md) has Python 3.12 and torch but not our audio/VQ packages, and
everything it gets travels inside the repository copy (64 MiB in all). So the kit holds cp312 wheels of the
missing packages, the training voices as the original 64 kbit/s G.722 files in one tar.xz (the most compact
lossless form of the corpus: as FLAC the same prompts take 88 MB, as G.722 35 MB), and the run's last
checkpoint and config.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import io
import json
import lzma
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
RUN = Path("runs/default-model")
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
    "soundfile": "reading the FLAC corpus",
    "cffi": "soundfile",
    "pycparser": "cffi",
    "pesq": "validation PESQ (no binary wheel on PyPI: built here with CPython 3.12)",
    "pystoi": "validation STOI",
    "G722": "decoding the corpus",
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

# Voices: the held-out French voice never travels (evaluation happens here). Spanish is the English
# speaker again and the largest voice: only its `valid` prompts travel, so the validation crops on the
# device are exactly those of the CPU run (same files, same order) and the PESQ curve stays comparable.
FULL_VOICES = ("en", "it", "ru")
VALID_ONLY_VOICES = ("es",)


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
def corpus_members(sounds_dir: Path, full=FULL_VOICES, valid_only=VALID_ONLY_VOICES) -> list[tuple[Path, str]]:
    """(source file, name in the archive) of every G.722 prompt that trains or validates, plus transcripts."""
    from neurocodec.data import debian

    members = []
    for lang in [*full, *valid_only]:
        voice = debian.VOICE_BY_LANG[lang]
        vdir = debian._voice_dir(voice, sounds_dir)
        if vdir is None:
            raise SystemExit(f"gpukit: no {lang} voice under {sounds_dir}; install {voice.package}")
        for src in sorted(vdir.rglob("*.g722")):
            key = src.relative_to(vdir).with_suffix("").as_posix()
            if not debian._is_speech(key):
                continue
            if lang in valid_only and debian._split_for(voice, key, debian.TEST_LANGUAGE) != "valid":
                continue
            members.append((src, f"sounds/{voice.folder}/{key}.g722"))
        for place in (sounds_dir, debian.DOC_DIR / f"asterisk-core-sounds-{lang}"):
            text = place / f"core-sounds-{lang}.txt.gz"
            if text.is_file():  # prompt texts: the device's manifest then matches ours line for line
                members.append((text, f"sounds/core-sounds-{lang}.txt.gz"))
                break
    return members


def write_corpus(path: Path, members: list[tuple[Path, str]]) -> None:
    """A reproducible tar.xz (sorted, no owners or times), written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    with lzma.open(tmp, "wb", preset=6) as xz, tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for src, name in sorted(members, key=lambda m: m[1]):
            data = src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def cmd_corpus(args) -> int:
    """Device: unpack the kit's G.722 prompts and build the FLAC corpus with neurocodec.data.debian."""
    from neurocodec.data import debian

    kit = Path(args.kit)
    meta = json.loads((kit / "kit.json").read_text())
    unpack = Path(args.unpack)
    sounds, stamp = unpack / "sounds", unpack / "sounds.sha256"
    t0 = time.time()
    if not (stamp.is_file() and stamp.read_text() == meta["corpus"]["sha256"]):  # a warm machine keeps it
        with tarfile.open(kit / "corpus.tar.xz", "r:xz") as tar:
            tar.extractall(unpack, filter="data")
        stamp.write_text(meta["corpus"]["sha256"])
    summary = debian.build_corpus(args.out, languages=meta["corpus"]["languages"], test_language=None,
                                  sounds_dir=sounds, install=False, music=False, progress=False)
    log(debian.format_summary(summary))
    log(f"corpus {args.out}: {summary['total_hours']:.2f} h of speech in {time.time() - t0:.0f} s")
    # A file that fails here failed in the full corpus too (the packages ship an empty ru/is.g722): skipped.
    return 0 if summary["files"].get("split train") else 1


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
    """Device: the run continues from the kit's checkpoint, or from the device's own if it is further on
    (a warm machine keeps runs/ between calls). Prints the generator step it starts from."""
    kit, run = Path(args.kit), Path(args.run)
    meta = json.loads((kit / "kit.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    kit_step = int(meta["checkpoint"]["gen_step"])
    here = checkpoint_step(last) if last.is_file() else -1
    if here >= kit_step:
        print(f"resume: the device's own {last} (step {here}; the kit's is step {kit_step})", file=sys.stderr)
        data = last.read_bytes()
        clean = without_timer_state(data)
        if clean is not data:
            write_atomic(last, clean)
        print(here)
        return 0
    write_atomic(last, without_timer_state(lzma.decompress((kit / "last.ckpt.xz").read_bytes())))
    print(f"resume: the kit's checkpoint, step {kit_step}", file=sys.stderr)
    print(kit_step)
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
    from neurocodec.data import debian

    kit, run, sounds = ROOT / args.kit, ROOT / args.run, Path(args.sounds_dir)
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

    log("[2/4] corpus: G.722 prompts of the training voices")
    corpus = kit / "corpus.tar.xz"
    # In the order of debian.VOICES, as in the full corpus: the validation crops then come out identical.
    languages = [v.language for v in debian.VOICES if v.language in (*FULL_VOICES, *VALID_ONLY_VOICES)]
    debian.ensure_packages([debian.VOICE_BY_LANG[lang].package for lang in languages
                            if debian._voice_dir(debian.VOICE_BY_LANG[lang], sounds) is None])
    members = corpus_members(sounds)
    if args.rebuild_corpus or not corpus.is_file():
        write_corpus(corpus, members)
    raw = sum(src.stat().st_size for src, _ in members)
    log(f"  {len(members)} files, {raw / 2**20:.1f} MiB of G.722 -> {corpus.stat().st_size / 2**20:.1f} MiB tar.xz "
        f"(voices {', '.join(FULL_VOICES)}; {', '.join(VALID_ONLY_VOICES)}: valid prompts only)")

    log("[3/4] checkpoint and config of the run")
    data = (run / "checkpoints" / "last.ckpt").read_bytes()  # one read: the CPU run may replace the file
    step = checkpoint_step(data)
    write_atomic(kit / "last.ckpt.xz", lzma.compress(data, preset=6))
    shutil.copyfile(run / "config.yaml", kit / "config.yaml")
    log(f"  {run / 'checkpoints/last.ckpt'}: generator step {step}, {len(data) / 2**20:.1f} MiB "
        f"-> {(kit / 'last.ckpt.xz').stat().st_size / 2**20:.1f} MiB xz")

    meta = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                   text=True).stdout.strip(),
        "run": str(args.run),
        "checkpoint": {"gen_step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
        "corpus": {"languages": languages, "full_voices": list(FULL_VOICES),
                   "valid_only_voices": list(VALID_ONLY_VOICES), "files": len(members),
                   "sha256": file_sha256(corpus)},
        "wheels": sorted(p.name for p in (kit / "wheels").glob("*.whl")),
    }
    (kit / "kit.json").write_text(json.dumps(meta, indent=2) + "\n")

    log("[4/4] size of what travels")
    tree = travelling_bytes(ROOT, kit)
    kit_size = dir_bytes(kit)
    total = tree + kit_size
    log(f"  kit {kit_size / 2**20:.1f} MiB (wheels {dir_bytes(kit / 'wheels') / 2**20:.1f}, corpus "
        f"{corpus.stat().st_size / 2**20:.1f}, checkpoint {(kit / 'last.ckpt.xz').stat().st_size / 2**20:.1f}) "
        f"+ working tree {tree / 2**20:.1f} MiB = {total / 2**20:.1f} MiB of {SIZE_LIMIT / 2**20:.0f} MiB")
    if total > SIZE_LIMIT - SIZE_MARGIN:
        raise SystemExit(f"gpukit: {total / 2**20:.1f} MiB is over the device's {SIZE_LIMIT / 2**20:.0f} MiB "
                         f"(less a {SIZE_MARGIN / 2**20:.0f} MiB margin): drop untracked files from the tree")
    log(f"kit ready: {args.kit} (checkpoint step {step}); device call: see docs/default_model/GPU.md")
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
    for module in ("vector_quantize_pytorch", "soundfile", "pesq", "pystoi", "G722", "lightning", "tensorboard",
                   "neurocodec.train.fit", "neurocodec.train.module", "neurocodec.data.debian"):
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
        "kit_checkpoint_step": meta["checkpoint"]["gen_step"],
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
    kept, added = merge_metrics(run / "csv" / "metrics.csv", src / "metrics.csv")
    with open(run / "gpu_runs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"{show(last)}: step {local} -> {end} (GPU: {record['device']}, "
        f"{record.get('steps_per_s_sustained') or record.get('steps_per_s_overall')} steps/s); "
        f"metrics.csv: {kept} rows kept + {added} from the device; session logged in "
        f"{show(run / 'gpu_runs.jsonl')}")
    log("next: another GPU call (rebuild the kit first: bash scripts/gpu_kit.sh), or resume on the CPU "
        "(bash scripts/train_default_model.sh), or ship (python scripts/ship_default_model.py)")
    return 0


# ---------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="here: fill the kit folder")
    b.add_argument("--kit", default=str(KIT))
    b.add_argument("--run", default=str(RUN))
    b.add_argument("--sounds-dir", default="/usr/share/asterisk/sounds")
    b.add_argument("--rebuild-corpus", action="store_true", help="write corpus.tar.xz again even if present")
    b.set_defaults(func=cmd_build)
    c = sub.add_parser("check", help="device: versions, GPU, imports")
    c.add_argument("--require-gpu", action="store_true")
    c.set_defaults(func=cmd_check)
    k = sub.add_parser("corpus", help="device: unpack the G.722 prompts and build the corpus")
    k.add_argument("--kit", default=str(KIT))
    k.add_argument("--unpack", default="/tmp/gpukit", help="where the archive's sounds/ folder goes")
    k.add_argument("--out", default="/tmp/corpus")
    k.set_defaults(func=cmd_corpus)
    r = sub.add_parser("resume", help="device: put the checkpoint to resume from in place; prints its step")
    r.add_argument("--kit", default=str(KIT))
    r.add_argument("--run", default=str(RUN))
    r.set_defaults(func=cmd_resume)
    o = sub.add_parser("report", help="device: steps/s and the files to bring back")
    o.add_argument("--kit", default=str(KIT))
    o.add_argument("--run", default=str(RUN))
    o.add_argument("--out", required=True)
    o.add_argument("--start-step", type=int, required=True)
    o.add_argument("--fit-start", type=float, required=True, help="epoch seconds when fit.py started")
    o.add_argument("--fit-seconds", type=float, required=True)
    o.add_argument("--fit-rc", type=int, default=0)
    o.add_argument("--max-time", default=None)
    o.set_defaults(func=cmd_report)
    g = sub.add_parser("collect", help="here: install a device call's returned files into the run")
    g.add_argument("dir", help="the folder the device call's files came back to (the run tool's files_at)")
    g.add_argument("--run", default=str(RUN))
    g.add_argument("--force", action="store_true", help="replace a local checkpoint that is not behind, or "
                   "collect while a training of the run is going")
    g.set_defaults(func=cmd_collect)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
