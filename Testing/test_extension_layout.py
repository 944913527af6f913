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
