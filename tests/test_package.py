"""The package as a user installs it and as the next engineer reads it: a built wheel carries its configs and
.proto, and an installed copy (not the source tree) resolves `grvq_4cb` from another folder; codecs/ depends on no
training, data or image code, and no module imports itself through others."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_installed_elsewhere_finds_its_configs_and_proto(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "neurocodec", source / "neurocodec", ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(source)], check=True, capture_output=True)
    wheel = next(wheels.glob("neurocodec-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "neurocodec" / "configs").glob("*.yaml")}
    assert shipped and shipped <= names
    assert {"neurocodec/serve/v1/codec.proto", "neurocodec/weights/default.safetensors"} <= names

    # Install the wheel alone (its dependencies are this environment's) and run it from an unrelated folder.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install of the source tree
    env.pop("NEUROCODEC_CONFIG_DIR", None)
    where = subprocess.run([sys.executable, "-c", "import neurocodec.config as c; print(c.CONFIG_DIR)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(target), where
    info = subprocess.run([sys.executable, "-m", "neurocodec.cli", "info", "--model", "grvq_4cb"], cwd=elsewhere, env=env,
                          capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "grvq_4cb" in info.stdout and "2.000 kbps" in info.stdout, info.stdout


# -- the import graph ---------------------------------------------------------------------------------------
PACKAGE = REPO / "neurocodec"


def module_imports() -> dict[str, set[str]]:
    """neurocodec module -> the neurocodec modules it imports, at the top or inside functions alike (a lazy
    import is still a dependency). `from .x import y` counts as importing module x.y when that is a module."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {}
    for name, (path, is_package) in files.items():
        package = name if is_package else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "neurocodec")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "neurocodec":
                    continue
                for alias in node.names:
                    found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
        graph[name] = {t for t in found if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_codecs_import_no_training_data_or_image_code_and_nothing_imports_itself():
    graph = module_imports()
    assert "neurocodec.codecs.registry" in graph and "neurocodec.image.family" in graph  # the walk sees the tree
    forbidden = ("neurocodec.image", "neurocodec.train", "neurocodec.data")
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("neurocodec.codecs")
                   for t in targets if t.startswith(forbidden))
    assert wrong == []
    assert cycles(graph) == []
    # and the walk would catch both: an import into image/ from codecs/, and a cycle
    graph["neurocodec.codecs.model"] = graph["neurocodec.codecs.model"] | {"neurocodec.image.model"}
    assert cycles(graph) != []


def test_families_register_themselves_through_entry_points():
    from neurocodec.codecs.checkpoint import family_of_spec, load_codec
    from neurocodec.codecs.registry import families, family_claiming

    known = families()
    assert {"seanet", "semanticodec", "xy_single", "image"} <= set(known)
    assert known["image"].modality == "image" and known["seanet"].modality == "audio"
    assert family_of_spec("image_fsq:tiny") is known["image"] and family_of_spec("fsq:tiny") is known["seanet"]
    assert family_claiming("photo.PNG") is known["image"] and family_claiming("speech.wav") is None
    assert isinstance(load_codec("image_fsq:tiny"), known["image"].codec_class)  # built through the registry
