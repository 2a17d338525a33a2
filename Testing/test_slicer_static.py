"""Static checks of the Slicer extension: what can be verified without running Slicer.

The Qt panel itself only runs inside 3D Slicer (see docs/SLICER.md, "What is tested
where"); these tests keep its files consistent: widget names against the .ui file,
parameter names against the parameter node, CMake lists against the files on disk, and
the documentation of what only Slicer can check.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .helpers import REPO

MODULE_DIR = REPO / "LiverTumorSeg"
LIB_DIR = REPO / "LiverTumorSegLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverTumorSeg.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
GUI_FILES = sorted([MODULE_DIR / "LiverTumorSeg.py", *(MODULE_DIR / "LiverTumorSegWidgetHelpers").glob("*.py"),
                    *(MODULE_DIR / "Testing").rglob("*.py")])
REQUIRED_RESOURCES = {"models/registry.json", "models/demo-phantom/model.json", "models/demo-phantom/weights.pt",
                      "data/sample_phantom_ct.nii.gz"}


def ui_widgets() -> dict:
    """{objectName: class} of every widget in the .ui file."""
    tree = ElementTree.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def cmake_list(text: str, variable: str) -> list:
    """Entries of ``set(VARIABLE ...)`` in a CMake file."""
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"set({variable} ...) not found"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def test_every_widget_the_module_code_uses_is_in_the_ui_file():
    widgets = ui_widgets()
    used = set()
    for path in GUI_FILES:
        used |= {(name, path.name) for name in re.findall(r"\bui\.(\w+)", path.read_text(encoding="utf-8"))}
    missing = sorted(f"{name} (used in {where})" for name, where in used if name not in widgets)
    assert not missing, f"widgets used in code but absent from {UI_FILE.name}: {missing}"
    assert len({name for name, _ in used}) >= 10


def test_ui_parameter_names_are_parameter_node_fields():
    tree = ElementTree.parse(UI_FILE)
    bound = {}
    for widget in tree.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("class")
    source = (MODULE_DIR / "LiverTumorSegWidgetHelpers" / "parameters.py").read_text(encoding="utf-8")
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == "LiverTumorSegParameterNode")
    fields = {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    assert set(bound) <= fields, f"SlicerParameterName without a parameter: {sorted(set(bound) - fields)}"
    assert {"inputVolume", "outputSegmentation", "device", "quality", "showIn3D"} <= set(bound)
    assert bound["inputVolume"] == "qMRMLNodeComboBox" and bound["showIn3D"] == "QCheckBox"


def test_ui_declares_its_custom_widgets_and_scene_connections():
    tree = ElementTree.parse(UI_FILE)
    declared = {c.find("class").text for c in tree.iter("customwidget")}
    used = {w.get("class") for w in tree.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widgets: {sorted(custom - declared)}"
    receivers = {c.find("receiver").text for c in tree.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    # A qMRMLTableView given a scene but no table view node empties itself at the end of
    # every batch of scene changes (qMRMLTableView.cxx, updateWidgetFromViewNode): the
    # panel sets its table node directly and must not connect it to the scene.
    tables = {name for name, cls in ui_widgets().items() if cls == "qMRMLTableView"}
    mrml_widgets = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and cls != "qMRMLWidget"}
    assert tables and not tables & receivers, f"table views connected to the scene: {sorted(tables & receivers)}"
    assert mrml_widgets - tables <= receivers, f"qMRML widgets without the scene: {sorted(mrml_widgets - tables - receivers)}"
    button = next(w for w in tree.iter("widget") if w.get("name") == "applyButton")
    text = next(p for p in button.findall("property") if p.get("name") == "text")
    assert text.find("string").text == "Segment liver && tumor"


def test_cmake_lists_every_engine_python_file():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    listed = cmake_list(text, "LIB_PYTHON_SCRIPTS")
    on_disk = sorted(p.relative_to(LIB_DIR).as_posix() for p in LIB_DIR.rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(set(on_disk) - set(listed)) == [], "add these LiverTumorSegLib files to LiverTumorSeg/CMakeLists.txt"
    assert sorted(set(listed) - set(on_disk)) == [], "LiverTumorSeg/CMakeLists.txt lists files that do not exist"
    assert len(listed) == len(set(listed))


def test_cmake_lists_the_module_files_and_resources():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    scripts = [s.replace("${MODULE_NAME}", "LiverTumorSeg") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    helpers = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "LiverTumorSegWidgetHelpers").glob("*.py"))
    assert "LiverTumorSeg.py" in scripts and set(helpers) <= set(scripts), "list every GUI helper file"
    for entry in cmake_list(text, "MODULE_PYTHON_RESOURCES"):
        assert (MODULE_DIR / entry.replace("${MODULE_NAME}", "LiverTumorSeg")).is_file(), entry
    assert set(cmake_list(text, "LIB_RESOURCES")) == REQUIRED_RESOURCES
    assert re.search(r"slicerMacroBuildScriptedModule\((?:(?!\)).)*WITH_GENERIC_TESTS", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def cmake_folders(folder):
    """``folder`` and every folder its CMakeLists.txt reaches through add_subdirectory."""
    yield folder
    for sub in re.findall(r"add_subdirectory\((\S+)\)", (folder / "CMakeLists.txt").read_text(encoding="utf-8")):
        yield from cmake_folders(folder / sub)


def test_every_python_test_file_is_registered_where_slicer_can_import_it():
    # slicer_add_python_unittest runs slicer.testing.runUnitTest([build folder, source
    # folder], name): the script must sit beside the CMakeLists.txt that registers it.
    registered = {}
    for folder in cmake_folders(MODULE_DIR):
        for script in re.findall(r"slicer_add_python_unittest\(SCRIPT (\S+)\)", (folder / "CMakeLists.txt").read_text(encoding="utf-8")):
            script = script.replace("${MODULE_NAME}", "LiverTumorSeg")
            assert "/" not in script and (folder / script).is_file(), f"{folder}/CMakeLists.txt registers {script}"
            registered[folder / script] = True
    tests = set((MODULE_DIR / "Testing").rglob("*Test.py")) | {MODULE_DIR / "LiverTumorSeg.py"}
    assert tests == set(registered), f"not registered: {sorted(map(str, tests - set(registered)))}"


def test_bundled_resources_exist():
    missing = [entry for entry in sorted(REQUIRED_RESOURCES) if not (LIB_DIR / entry).is_file()]
    assert not missing, f"listed in LiverTumorSeg/CMakeLists.txt but missing: {missing}"


def test_top_level_cmake_follows_the_extension_template():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                     "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"set\({variable}\s+\S", text), variable
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)
    for path in re.findall(r"\$\{LiverTumorSeg_REPOSITORY_URL\}/raw/main/([^\"\s]+)", text):
        assert (REPO / path).is_file(), f"the extension metadata points at {path}, which is not in the repository"
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(LiverTumorSeg)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, line


def test_gui_code_is_python_39_and_small():
    for path in GUI_FILES:
        source = path.read_text(encoding="utf-8")
        ast.parse(source, filename=str(path), feature_version=(3, 9))
        assert len(source.splitlines()) <= 400, f"{path.name} is past 400 lines"
    assert len((MODULE_DIR / "LiverTumorSeg.py").read_text(encoding="utf-8").splitlines()) <= 200, "keep the module file thin"


def test_docs_say_what_only_slicer_can_check_and_how_to_run_the_self_test():
    text = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "README.md", REPO / "docs" / "SLICER.md") if p.is_file())
    lowered = text.lower()
    assert "qt panel" in lowered and "only inside slicer" in lowered
    assert "LiverTumorSegTest" in text and "reload and test" in lowered
    assert "additional module paths" in lowered
    assert "make package" in lowered
    assert "Testing/test_mrml.py" in text


def test_the_bundled_sample_ct_is_registered_with_sample_data_and_verified(tmp_path):
    """The registration as Slicer's SampleData module receives it: a file address that
    urllib can fetch, and a checksum that matches the bundled CT."""
    import hashlib
    import importlib.util
    import urllib.request
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("sampledata", MODULE_DIR / "LiverTumorSegWidgetHelpers" / "sampledata.py")
    sampledata = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sampledata)
    calls = []
    fake = SimpleNamespace(SampleDataLogic=SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw)))
    icon = MODULE_DIR / "Resources" / "Icons" / "LiverTumorSeg.png"
    assert sampledata.registerSampleData(fake, icon) == "LiverTumorSegPhantom"
    (call,) = calls
    assert call["category"] == "LiverTumorSeg" and Path(call["thumbnailFileName"]).is_file()
    fetched, _ = urllib.request.urlretrieve(call["uris"], tmp_path / call["fileNames"])  # as SampleData downloads
    algo, digest = call["checksums"].split(":")
    assert algo == "SHA256" and hashlib.sha256(Path(fetched).read_bytes()).hexdigest() == digest
    module_text = (MODULE_DIR / "LiverTumorSeg.py").read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", _registerSampleData)' in module_text
