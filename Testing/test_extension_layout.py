"""The extension's structure rules: what Slicer installs, which layer may import what."""

import ast
import py_compile
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PromiseSegment"


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize(
    "folder, forbidden",
    [("PromiseSegmentLib", {"slicer", "qt", "vtk", "ctk"}), ("PromiseSegmentSlicerLib", {"qt", "ctk"})],
)
def test_layers_do_not_import_what_they_must_not(folder, forbidden):
    for path in sorted((MODULE / folder).rglob("*.py")):
        bad = forbidden & set(imported_modules(path))
        assert not bad, f"{path.name} imports {bad}"


def test_slicer_only_files_compile():
    """The files only Slicer can import (module widget, effect, Slicer-hosted tests) at least compile."""
    for path in [
        MODULE / "PromiseSegment.py",
        *MODULE.glob("SegmentEditorPromiseSegmentLib/*.py"),
        *MODULE.glob("Testing/Python/*.py"),
    ]:
        py_compile.compile(str(path), doraise=True)


def cmake_installed_files(cmake_path: Path) -> set:
    """The files ``slicerMacroBuildScriptedModule`` installs, from the module's CMakeLists.txt: ``file(GLOB
    [_RECURSE] VAR RELATIVE ... [CONFIGURE_DEPENDS] "pattern")`` evaluated here, then the SCRIPTS and
    RESOURCES lists with their variables expanded."""
    text = cmake_path.read_text(encoding="utf-8")
    folder = cmake_path.parent
    variables = {
        "MODULE_NAME": re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1),
        "CMAKE_CURRENT_SOURCE_DIR": str(folder),
    }

    def expand(value):
        return re.sub(
            r"\$\{(\w+)\}",
            lambda m: (
                variables[m.group(1)] if isinstance(variables[m.group(1)], str) else ";".join(variables[m.group(1)])
            ),
            value,
        )

    for kind, var, pattern in re.findall(
        r"file\((GLOB(?:_RECURSE)?) (\w+) RELATIVE \S+ (?:CONFIGURE_DEPENDS )?"
        r"\"([^\"]+)\"\)",
        text,
    ):
        pattern = expand(pattern)
        if kind == "GLOB_RECURSE":  # "dir/*" matches every file below dir
            pattern = pattern.replace("/*", "/**/*")
        variables[var] = sorted(str(p.relative_to(folder)) for p in folder.glob(pattern) if p.is_file())
    installed = set()
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s+(.*?)\)", text, re.S):
        for item in block.split():
            installed.update(v for v in expand(item).split(";") if v)
    return installed


def test_cmake_installs_every_file_the_module_uses_at_runtime():
    """The classic "works from source, broken from the Extensions Manager" bug: every tracked file of the
    module (code, icons, requirements, bundled demo data) except tests and build files is installed."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "PromiseSegment"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.fail("needs a git checkout: " + tracked.stderr)
    runtime = {
        str(Path(f).relative_to("PromiseSegment"))
        for f in tracked.stdout.split()
        if "/Testing/" not in f and not f.endswith("CMakeLists.txt")
    }
    installed = cmake_installed_files(MODULE / "CMakeLists.txt")
    assert runtime - installed == set(), "not installed by PromiseSegment/CMakeLists.txt"
    assert {p for p in installed if not (MODULE / p).is_file()} == set(), "listed but missing"


def test_slicer_tests_are_registered():
    cmake = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    tests = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", tests):
        assert (MODULE / "Testing" / "Python" / script).exists()
    assert {p.name for p in (MODULE / "Testing" / "Python").glob("*Test.py")} <= set(
        re.findall(r"SCRIPT (\S+)\)", tests)
    )


# What Slicer/ExtensionsIndex's check_description_files.py checks without network, written here (nothing
# vendored): JSON format, the catalog-entry schema's keys and types, category, scm_url, names, the top-level
# CMakeLists.txt (project name, icon and screenshot URLs pointing at committed PNGs), license, size.
SCHEMA_TYPES = {
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,
    "build_subdirectory": str,
    "enabled": bool,
    "tier": int,
}
KNOWN_CATEGORIES = {"Segmentation", "Quantification", "Filtering", "Registration", "Examples", "Informatics"}


def test_extension_description_passes_the_index_checks():
    import json

    path = ROOT / "PromiseSegment.json"
    raw = path.read_bytes()
    assert b"\r" not in raw, "LF line endings only"
    entry = json.loads(raw)
    assert re.search(r"slicer-extension-catalog-entry-schema-v1\.\d+\.\d+\.json", entry["$schema"])
    assert {"$schema", "category", "scm_url"} <= set(entry) and set(entry) <= set(SCHEMA_TYPES)
    for key, value in entry.items():
        assert isinstance(value, SCHEMA_TYPES[key]), key
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    assert entry.get("scm_type", "git") in ("git", "local")
    assert entry["category"] in KNOWN_CATEGORIES
    assert entry["scm_url"].split("://")[0] in ("git", "https")
    name = path.stem
    assert not name.lower().startswith("slicer")
    assert entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git").startswith("Slicer")
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert re.search(r"project\s*\(\s*([^\s)]+)", cmake).group(1) == name
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake


@pytest.mark.parametrize("variable", ["EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"])
def test_catalog_images_are_committed_pngs(variable):
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    urls = re.search(rf'set\s*\({variable}\s*"([^"]+)"\s*\)', cmake)
    assert urls, f"{variable} must be set to at least one URL (the index refuses an empty one)"
    for url in urls.group(1).split():
        prefix = "https://raw.githubusercontent.com/PromiseSegment/SlicerPromiseSegment/main/"
        assert url.startswith(prefix), url
        image = ROOT / url[len(prefix) :]
        assert image.is_file() and image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url


def test_license_and_repository_size():
    import subprocess

    assert (ROOT / "LICENSE.txt").is_file()
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file()) < 100 * 2**20


def test_what_slicer_imports_before_asking_to_install_torch_needs_no_torch():
    """The effect and module import these before the first use installs torch (after asking the user);
    with torch absent they must still import (here torch is made unimportable in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
        "import PromiseSegmentLib.errors, PromiseSegmentLib.paths, PromiseSegmentSlicerLib.adapter_folder, "
        "PromiseSegmentSlicerLib.dependencies, PromiseSegmentSlicerLib.mrml, PromiseSegmentSlicerLib.interaction; "
        "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}"
    )
    done = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


CORE = MODULE / "PromiseSegmentLib"


def module_name(path: Path) -> str:
    parts = path.relative_to(MODULE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_imports() -> dict:
    """core module -> the core modules it imports (top level or inside functions: a cycle either way)."""
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("PromiseSegmentLib"):
                deps.update(
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                )
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in modules)
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    return graph


def test_the_core_has_no_import_cycle():
    graph = core_imports()
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            assert state.get(dep) != "open", " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_core_uses_absolute_imports_only():
    """Sub-packages import each other by full name: a relative import hides which layer it reaches."""
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path.relative_to(MODULE)}:{node.lineno}"


# Which sub-package may import which: the command line on top, then cohorts, training/evaluation, inference,
# the model, backbones, data; the shared modules (errors, names, modes, paths) at the bottom import nothing.
LAYERS = {
    "cli": {"cohort", "training", "evaluation", "inference", "model", "backbones", "data", "base"},
    "cohort": {"inference", "model", "backbones", "data", "base"},
    "training": {"inference", "model", "backbones", "data", "base", "evaluation"},
    "evaluation": {"inference", "model", "backbones", "data", "base"},
    "inference": {"model", "backbones", "data", "base"},
    "model": {"inference", "backbones", "data", "base"},
    "backbones": {"inference", "data", "base"},
    "data": {"base"},
    "base": {"base"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (CORE / parts[1]).is_dir()) else "base"


def test_sub_packages_import_only_the_layers_below():
    bad = [
        f"{m} -> {d}"
        for m, deps in core_imports().items()
        for d in deps
        if layer(d) not in LAYERS[layer(m)] | {layer(m)}
    ]
    assert not bad


def test_every_sub_package_imports_without_torch():
    """The command line answers argument errors before torch is imported: no sub-package's __init__ may
    pull it in."""
    import subprocess
    import sys

    packages = sorted(module_name(p) for p in CORE.rglob("__init__.py"))
    code = (
        "import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
        f"import {', '.join(packages)}, PromiseSegmentLib.cli.main"
    )
    done = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_no_function_in_the_extension_is_over_60_lines():
    long = []
    for path in sorted(MODULE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long


def test_the_core_has_short_modules_and_functions():
    """One concept per module, one job per function: at most 350 lines a module, 50 a function."""
    too_long = []
    for path in sorted(CORE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 350:
            too_long.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 50:
                too_long.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
                )
    assert not too_long
