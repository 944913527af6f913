"""The extension's structure rules: what Slicer installs, which layer may import what."""
import ast
import py_compile
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PromiseSegment"


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("folder, forbidden", [("PromiseSegmentLib", {"slicer", "qt", "vtk", "ctk"}),
                                               ("PromiseSegmentSlicerLib", {"qt", "ctk"})])
def test_layers_do_not_import_what_they_must_not(folder, forbidden):
    for path in sorted((MODULE / folder).glob("*.py")):
        bad = forbidden & set(imported_modules(path))
        assert not bad, f"{path.name} imports {bad}"


def test_slicer_only_files_compile():
    """The files only Slicer can import (module widget, effect, Slicer-hosted tests) at least compile."""
    for path in [MODULE / "PromiseSegment.py", *MODULE.glob("SegmentEditorPromiseSegmentLib/*.py"),
                 *MODULE.glob("Testing/Python/*.py")]:
        py_compile.compile(str(path), doraise=True)


def test_cmake_installs_every_python_file_and_registers_the_slicer_tests():
    cmake = (MODULE / "CMakeLists.txt").read_text()
    assert 'file(GLOB MODULE_CORE_SCRIPTS RELATIVE ${CMAKE_CURRENT_SOURCE_DIR} "${MODULE_NAME}Lib/*.py")' in cmake
    assert '"${MODULE_NAME}SlicerLib/*.py"' in cmake
    effect_files = {p.name for p in (MODULE / "SegmentEditorPromiseSegmentLib").glob("*.py")}
    listed = set(re.findall(r"SegmentEditor\$\{MODULE_NAME\}Lib/(\w+\.py)", cmake))
    assert effect_files == listed
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    tests = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", tests):
        assert (MODULE / "Testing" / "Python" / script).exists()
    assert {p.name for p in (MODULE / "Testing" / "Python").glob("*Test.py")} <= set(
        re.findall(r"SCRIPT (\S+)\)", tests))


def test_what_slicer_imports_before_asking_to_install_torch_needs_no_torch():
    """The effect and module import these before the first use installs torch (after asking the user);
    with torch absent they must still import (here torch is made unimportable in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.path.insert(0, sys.argv[1]); "
            "import PromiseSegmentLib.errors, PromiseSegmentLib.paths, PromiseSegmentSlicerLib.adapters, "
            "PromiseSegmentSlicerLib.dependencies, PromiseSegmentSlicerLib.mrml, PromiseSegmentSlicerLib.interaction; "
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}")
    done = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
