"""components.factory: the one model-factory loader (CLI --model, registry spec.json, candidate dirs, config files).

Every bad reference gives a FactoryError whose message starts with the field it came from, names the
reference and says what was expected.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from components.factory import FactoryError, ModelSpec, build_model, resolve

FIELD = "model.factory"


@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    """A team's code directory (not on sys.path) with a package of factories; sys.path restored after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    pkg = tmp_path / "team_code" / "teampkg_factory_tests"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "from torch import nn\n"
        "def tiny(width=4):\n    return nn.Linear(2, width)\n"
        "class Builder:\n    @staticmethod\n    def create():\n        return nn.Linear(2, 3)\n"
        "def broken():\n    raise RuntimeError('no GPU here')\n"
        "def not_a_model():\n    return 42\n"
        "NOT_CALLABLE = 7\n"
    )
    (pkg / "raises_on_import.py").write_text("raise ValueError('config missing')\n")
    (pkg / "imports_missing.py").write_text("import no_such_dependency_xyz\n")
    yield tmp_path / "team_code"
    for name in [m for m in sys.modules if m.startswith("teampkg_factory_tests")]:
        del sys.modules[name]


def error(call) -> str:
    with pytest.raises(FactoryError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"{FIELD}: "), msg
    return msg


# ------------------------------------------------------------------------------------------ resolve
def test_resolve_with_roots_and_dotted_attributes(code_dir):
    fn = resolve("teampkg_factory_tests.models:tiny", field=FIELD, roots=[code_dir])
    assert isinstance(fn(), nn.Linear)
    assert str(code_dir) == sys.path[0]
    create = resolve("teampkg_factory_tests.models:Builder.create", field=FIELD, roots=[code_dir])
    assert create().out_features == 3
    resolve("teampkg_factory_tests.models:tiny", field=FIELD, roots=[code_dir])
    assert sys.path.count(str(code_dir)) == 1  # not inserted twice


@pytest.mark.parametrize("ref", ["no_colon", "pkg.mod:", ":fn", "pkg..mod:fn", "pkg.mod:fn()", "a b:c", "pkg:1x"])
def test_bad_grammar_names_field_reference_and_expectation(ref):
    msg = error(lambda: resolve(ref, field=FIELD))
    assert repr(ref) in msg and "expected 'package.module:factory'" in msg


def test_not_a_string():
    assert "must be a string" in error(lambda: resolve(None, field=FIELD))


def test_module_not_importable_says_why(code_dir):
    msg = error(lambda: resolve("no_such_module_xyz.models:f", field=FIELD, roots=[code_dir]))
    assert "cannot import module 'no_such_module_xyz.models'" in msg and "No module named" in msg
    assert "'no_such_module_xyz.models:f'" in msg


def test_import_raising_gives_type_and_message(code_dir):
    msg = error(lambda: resolve("teampkg_factory_tests.raises_on_import:f", field=FIELD, roots=[code_dir]))
    assert "raised ValueError: config missing" in msg
    # a dependency missing *inside* the team's module is an import error of that module, not "not found"
    msg = error(lambda: resolve("teampkg_factory_tests.imports_missing:f", field=FIELD, roots=[code_dir]))
    assert "raised ModuleNotFoundError" in msg and "no_such_dependency_xyz" in msg


def test_missing_attribute(code_dir):
    msg = error(lambda: resolve("teampkg_factory_tests.models:nope", field=FIELD, roots=[code_dir]))
    assert "module 'teampkg_factory_tests.models' has no attribute 'nope'" in msg
    msg = error(lambda: resolve("teampkg_factory_tests.models:Builder.nope", field=FIELD, roots=[code_dir]))
    assert "teampkg_factory_tests.models:Builder has no attribute 'nope'" in msg


def test_not_callable(code_dir):
    msg = error(lambda: resolve("teampkg_factory_tests.models:NOT_CALLABLE", field=FIELD, roots=[code_dir]))
    assert "is a int, not callable" in msg and "expected a function or class" in msg


def test_file_references(tmp_path, code_dir):
    (tmp_path / "factories.py").write_text("from torch import nn\ndef net():\n    return nn.Linear(3, 1)\n")
    assert build_model(f"{tmp_path / 'factories.py'}:net", field=FIELD).in_features == 3
    assert build_model("factories.py:net", field=FIELD, roots=[tmp_path]).in_features == 3  # relative to a root
    msg = error(lambda: resolve("missing.py:net", field=FIELD, roots=[tmp_path]))
    assert "file 'missing.py'" in msg and "does not exist" in msg
    (tmp_path / "bad.py").write_text("1 / 0\n")
    assert "raised ZeroDivisionError" in error(lambda: resolve("bad.py:f", field=FIELD, roots=[tmp_path]))


# ------------------------------------------------------------------------------------------ build
def test_build_errors(code_dir):
    msg = error(lambda: build_model("teampkg_factory_tests.models:broken", field=FIELD, roots=[code_dir]))
    assert "calling teampkg_factory_tests.models:broken() raised RuntimeError: no GPU here" in msg
    msg = error(lambda: build_model("teampkg_factory_tests.models:not_a_model", field=FIELD, roots=[code_dir]))
    assert "returned int, expected a torch.nn.Module" in msg
    msg = error(lambda: build_model("teampkg_factory_tests.models:tiny", {"depth": 2}, field=FIELD, roots=[code_dir]))
    assert "raised TypeError" in msg and "depth" in msg
    model = build_model("teampkg_factory_tests.models:tiny", {"width": 5}, field=FIELD, roots=[code_dir])
    assert model.out_features == 5 and not model.training


# ------------------------------------------------------------------------------------------ ModelSpec
def test_model_spec_roundtrip_and_build(tmp_path, code_dir):
    spec = ModelSpec("teampkg_factory_tests.models:tiny", {"width": 6})
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    path = spec.save(tmp_path / "spec.json")
    assert json.loads(path.read_text()) == {"factory": "teampkg_factory_tests.models:tiny", "kwargs": {"width": 6}}
    assert ModelSpec.load(path) == spec
    assert spec.build(roots=[code_dir]).out_features == 6
    with pytest.raises(FactoryError, match=r"^model\.factory: calling .*broken\(\) raised RuntimeError"):
        ModelSpec("teampkg_factory_tests.models:broken", {}).build(roots=[code_dir], field=FIELD)
    assert isinstance(ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 3]}).build(), torch.nn.Module)


def test_model_spec_rejects_bad_fields(tmp_path):
    with pytest.raises(FactoryError, match=r"^ModelSpec\.factory: 'os\.system' is not a factory reference"):
        ModelSpec("os.system", {})
    with pytest.raises(FactoryError, match=r"^ModelSpec\.factory: 'models\.py:net' names a file"):
        ModelSpec("models.py:net", {})
    with pytest.raises(FactoryError, match=r"^ModelSpec\.kwargs: expected a mapping"):
        ModelSpec("tests.helpers.models:mlp", [1, 2])
    with pytest.raises(FactoryError, match=r"^ModelSpec\.kwargs: expected JSON values"):
        ModelSpec("tests.helpers.models:mlp", {"x": object()})
    with pytest.raises(FactoryError, match=r"^ModelSpec\.kwargs: expected JSON values"):
        ModelSpec("tests.helpers.models:mlp", {"x": float("nan")})
    with pytest.raises(FactoryError, match="exactly the fields"):
        ModelSpec.from_dict({"factory": "a:b"})
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(FactoryError, match="spec.json"):
        ModelSpec.load(tmp_path / "spec.json")


def test_importing_the_loader_does_not_import_torch():
    import subprocess

    code = "import sys, components.factory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
