"""components.config: the configuration file a team versions next to its code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.config import (
    ConfigError,
    LidgateConfig,
    SearchSection,
    SpecSection,
    load_config,
    parse_config,
)
from tests.helpers.paths import REPO

FULL_YAML = """\
version: 1
name: my-model
code: [".", "src"]
model:
  factory: team_models:make_mlp
  kwargs: {hidden: 32, layers: [64, 32]}
  weights: weights/v1.safetensors
data:
  task: golden
  source: data/all.csv
  split: {train: 0.6, search: 0.2, certification: 0.2, seed: 3}
  features: [f1, f2]
  label: target
  shape: [2]
  classes: [0, 1]
  value_range: [0.0, 1.0]
spec:
  metric: balanced_accuracy
  tau_from_accuracy: 0.12
  confidence: 0.9
training:
  function: team_train:fit
  kwargs: {epochs: 2, lr: 1e-3, batch_size: 64}
  strategy: closest
  seed: 5
search:
  iterations: 100
  checkpoints: 5
  batch_size: 250
  bound: linear
  biasing: si
  frozen_fraction: 0.5
registry:
  tracking_uri: sqlite:///mlflow.db
  home: state
export:
  onnx: false
"""

FULL_TOML = """\
version = 1
name = "my-model"
code = [".", "src"]

[model]
factory = "team_models:make_mlp"
kwargs = { hidden = 32, layers = [64, 32] }
weights = "weights/v1.safetensors"

[data]
task = "golden"
source = "data/all.csv"
split = { train = 0.6, search = 0.2, certification = 0.2, seed = 3 }
features = ["f1", "f2"]
label = "target"
shape = [2]
classes = [0, 1]
value_range = [0.0, 1.0]

[spec]
metric = "balanced_accuracy"
tau_from_accuracy = 0.12
confidence = 0.9

[training]
function = "team_train:fit"
kwargs = { epochs = 2, lr = 0.001, batch_size = 64 }
strategy = "closest"
seed = 5

[search]
iterations = 100
checkpoints = 5
batch_size = 250
bound = "linear"
biasing = "si"
frozen_fraction = 0.5

[registry]
tracking_uri = "sqlite:///mlflow.db"
home = "state"

[export]
onnx = false
"""

MINIMAL = {"version": 1, "name": "m", "model": {"factory": "team_models:make"},
           "data": {"source": "all.csv"}, "spec": {"tau": 0.8}}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_doc(tmp_path: Path, doc: dict, name: str = "lidgate.yaml") -> Path:
    return write(tmp_path, name, yaml.safe_dump(doc, sort_keys=False))


# --------------------------------------------------------------------------- valid files
def test_full_yaml_loads_with_paths_resolved_against_the_file(tmp_path, monkeypatch):
    path = write(tmp_path / "team", "lidgate.yaml", FULL_YAML)
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    cfg = load_config("team/lidgate.yaml")
    team = (tmp_path / "team").resolve()
    assert cfg.base_dir == team
    assert cfg.code == [team, team / "src"]
    assert cfg.data.source == team / "data/all.csv"
    assert cfg.model.weights == team / "weights/v1.safetensors"
    assert cfg.registry.home == team / "state"
    assert cfg.registry.tracking_uri == "sqlite:///mlflow.db"  # URIs are MLflow's business: unchanged
    assert cfg.data.form == "source"
    assert cfg.data.split is not None and cfg.data.split.fractions() == {"train": 0.6, "search": 0.2,
                                                                         "certification": 0.2}
    assert cfg.training.kwargs == {"epochs": 2, "lr": 0.001, "batch_size": 64}  # 1e-3 is a number
    assert cfg.spec.threshold(0.9) == pytest.approx(0.78)
    assert path.exists()


def test_yaml_toml_and_json_with_the_same_content_are_equal(tmp_path):
    from_yaml = load_config(write(tmp_path, "a.yaml", FULL_YAML))
    from_toml = load_config(write(tmp_path, "a.toml", FULL_TOML))
    from_json = load_config(write(tmp_path, "a.json", json.dumps(yaml.safe_load(FULL_YAML.replace("1e-3", "0.001")))))
    assert from_yaml == from_toml == from_json
    assert from_yaml.to_dict() == from_toml.to_dict()
    assert from_yaml.sha256() == from_toml.sha256() == from_json.sha256()


def test_defaults_are_filled_in(tmp_path):
    cfg = load_config(write_doc(tmp_path, MINIMAL))
    assert cfg.code == [tmp_path.resolve()]
    assert cfg.data.task == "task" and cfg.data.label == "label" and cfg.data.features is None
    assert cfg.data.split is not None and cfg.data.split.seed == 0
    assert cfg.data.split.fractions() == {"train": 0.6, "search": 0.2, "certification": 0.2}
    assert (cfg.spec.metric, cfg.spec.confidence) == ("accuracy", 0.95)
    assert cfg.training.function is None and cfg.training.kwargs == {} and cfg.training.seed == 0
    assert cfg.training.strategy == "sample_largest_closest"
    assert (cfg.search.iterations, cfg.search.checkpoints, cfg.search.batch_size) == (200, 10, 500)
    assert (cfg.search.bound, cfg.search.biasing, cfg.search.frozen_fraction) == ("ibp", "fisher", 0.8)
    assert cfg.registry.home is None and cfg.registry.tracking_uri is None
    assert cfg.export.onnx is True
    assert cfg.spec.threshold() == 0.8


def test_to_dict_keeps_paths_as_written_and_the_digest_does_not_depend_on_the_checkout(tmp_path):
    one = write(tmp_path / "one", "lidgate.yaml", FULL_YAML)
    shutil.copytree(tmp_path / "one", tmp_path / "elsewhere" / "two")
    a, b = load_config(one), load_config(tmp_path / "elsewhere" / "two" / "lidgate.yaml")
    assert a.data.source != b.data.source
    d = a.to_dict()
    assert d["data"]["source"] == "data/all.csv" and d["code"] == [".", "src"]
    assert d["registry"]["home"] == "state"
    assert a.sha256() == b.sha256()
    json.dumps(d, allow_nan=False)  # JSON-able
    assert a.canonical_json() == json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def test_digest_changes_with_the_content(tmp_path):
    a = load_config(write_doc(tmp_path, MINIMAL, "a.yaml"))
    changed = {**MINIMAL, "spec": {"tau": 0.81}}
    b = load_config(write_doc(tmp_path, changed, "b.yaml"))
    assert a.sha256() != b.sha256()


def test_three_data_forms_and_the_mlflow_model_form(tmp_path):
    files = {**MINIMAL, "data": {"train": "tr.parquet", "search": "se.npz", "certification": "ce.csv"}}
    cfg = load_config(write_doc(tmp_path, files, "files.yaml"))
    assert cfg.data.form == "files" and cfg.data.split is None
    loader = {**MINIMAL, "data": {"loader": {"function": "team_data:load", "kwargs": {"n": 10}}}}
    cfg = load_config(write_doc(tmp_path, loader, "loader.yaml"))
    assert cfg.data.form == "loader" and cfg.data.split is not None and cfg.data.loader is not None
    assert cfg.data.loader.kwargs == {"n": 10}
    for ref, field, value in (({"name": "other-model", "version": 3}, "version", "3"),
                              ({"name": "other-model", "alias": "champion"}, "alias", "champion")):
        cfg = load_config(write_doc(tmp_path, {**MINIMAL, "model": {"mlflow": ref}}, "mlflow.yaml"))
        assert cfg.model.mlflow is not None and getattr(cfg.model.mlflow, field) == value


def test_empty_sections_and_kwargs_mean_defaults(tmp_path):
    text = ("version: 1\nname: m\nmodel:\n  factory: a:b\n  kwargs:\ndata:\n  source: a.csv\n  split:\n"
            "spec:\n  tau: 0.5\ntraining:\nsearch:\nregistry:\nexport:\n")
    cfg = load_config(write(tmp_path, "lidgate.yaml", text))
    assert cfg.model.kwargs == {} and cfg.training.strategy == "sample_largest_closest"
    assert cfg.data.split is not None and cfg.data.split.seed == 0
    assert cfg.to_dict() == load_config(write_doc(tmp_path, {**MINIMAL, "model": {"factory": "a:b"},
                                                             "data": {"source": "a.csv"},
                                                             "spec": {"tau": 0.5}}, "b.yaml")).to_dict()


def test_configuration_is_frozen(tmp_path):
    cfg = load_config(write_doc(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        cfg.name = "other"  # type: ignore[misc]


def test_search_options_become_search_config_fields(tmp_path):
    doc = {**MINIMAL, "search": {"iterations": 50, "bound": "linear",
                                 "options": {"alpha": 0.5, "tau_margin": 0.01, "lr_multiplier_range": [0.1, 10]}}}
    sc = load_config(write_doc(tmp_path, doc)).search.search_config()
    assert (sc.iterations, sc.method, sc.alpha, sc.tau_margin) == (50, "linear", 0.5, 0.01)
    assert sc.lr_multiplier_range == (0.1, 10)


def test_direct_construction_keeps_paths_as_given():
    cfg = LidgateConfig.model_validate(MINIMAL)
    assert cfg.data.source == Path("all.csv") and cfg.base_dir == Path.cwd()
    assert cfg.to_dict()["data"]["source"] == "all.csv"


def test_importing_the_module_does_not_import_torch():
    code = ("import sys, components.config as c; "
            "c.parse_config({'version': 1, 'name': 'm', 'model': {'factory': 'a:b'}, "
            "'data': {'source': 'x.csv'}, 'spec': {'tau': 0.5}}); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------- errors
def _mutate(doc: dict, dotted: str, value) -> dict:
    doc = json.loads(json.dumps(doc))
    *parents, last = dotted.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


_DELETE = object()

# (dotted key to set, value, field path the error must name, a fragment of "what was expected")
SCHEMA_ERRORS = [
    ("data.split", {"train": 1.5, "search": 0.2, "certification": 0.2}, "data.split.train",
     "a number in (0, 1), got 1.5"),
    ("data.split", {"train": 0.5, "search": 0.2, "certification": 0.2}, "data.split", "sum to 1, got 0.9"),
    ("data.split", {"trian": 0.6}, "data.split.trian", "did you mean 'train'"),
    ("data.split", {"train": "0.6", "search": 0.2, "certification": 0.2}, "data.split.train", "a number, got \"0.6\""),
    ("data.split", {"seed": -1}, "data.split.seed", "an integer ≥ 0, got -1"),
    ("trainig", {}, "trainig", "did you mean 'training'"),
    ("name", "bad name!", "name", "A-Z a-z 0-9 _ . -"),
    ("name", "x" * 101, "name", "1-100 characters"),
    ("name", _DELETE, "name", "required"),
    ("model", _DELETE, "model", "required"),
    ("code", ["", 3], "code[0]", "a path"),
    ("model.factory", "no_colon", "model.factory", "package.module:callable"),
    ("model.mlflow", {"name": "x", "version": "3"}, "model", "exactly one of model.factory or model.mlflow"),
    ("model.kwargs", {"a": float("inf")}, "model.kwargs.a", "a finite number"),
    ("model.weights", "weights/v1.pt", "model.weights", ".safetensors"),
    ("data.train", "a.parquet", "data", "exactly one data form"),
    ("data.source", "data/all.txt", "data.source", ".parquet, .pq, .csv, .npz"),
    ("data.features", ["label"], "data.features", "must not include the label column"),
    ("data.classes", [1, 1], "data.classes", "distinct class ids"),
    ("data.classes", [-1], "data.classes[0]", "an integer ≥ 0"),
    ("data.value_range", [1.0, 0.0], "data.value_range", "low ≤ high"),
    ("data.shape", [0, 28], "data.shape[0]", "an integer ≥ 1"),
    ("data.task", "has space", "data.task", "task name"),
    ("spec.tau", 1.5, "spec.tau", "a number in [0, 1], got 1.5"),
    ("spec.tau_from_accuracy", 0.1, "spec", "exactly one of spec.tau or spec.tau_from_accuracy, got tau and"),
    ("spec.tau", _DELETE, "spec", "got none of them"),
    ("spec.metric", "f1", "spec.metric", "'accuracy' or 'balanced_accuracy'"),
    ("spec.confidence", 1, "spec.confidence", "a number in (0, 1), got 1"),
    ("training.strategy", "nearest", "training.strategy", "'closest'"),
    ("training.kwargs", {"lrr": 0.1}, "training.kwargs.lrr", "did you mean 'lr'"),
    ("training.kwargs", {"epochs": 0}, "training.kwargs.epochs", "an integer ≥ 1, got 0"),
    ("training.kwargs", {"seed": 1}, "training.kwargs.seed", "training.seed"),
    ("search.checkpoints", 300, "search.checkpoints", "at most search.iterations"),
    ("search.bound", "crown", "search.bound", "'ibp' or 'linear'"),
    ("search.biasing", "random", "search.biasing", "'fisher'"),
    ("search.frozen_fraction", 1.0, "search.frozen_fraction", "a number in [0, 1), got 1"),
    ("search.iterations", True, "search.iterations", "an integer, got true"),
    ("search.options", {"alpah": 0.5}, "search.options.alpah", "did you mean 'alpha'"),
    ("search.options", {"alpha": 2.0}, "search.options.alpha", "SearchConfig"),
    ("search.options", {"method": "linear"}, "search.options.method", "search.bound"),
    ("search.options", {"alpha": "big"}, "search.options.alpha", "a number"),
    ("registry.tracking_uri", 5, "registry.tracking_uri", "a string"),
    ("export.onnx", "yes", "export.onnx", "true or false"),
    ("data", "all.csv", "data", "a mapping"),
]


@pytest.mark.parametrize("key,value,field,expected", SCHEMA_ERRORS,
                         ids=[f"{e[0]}-{i}" for i, e in enumerate(SCHEMA_ERRORS)])
def test_schema_errors_name_the_file_the_field_and_what_was_expected(tmp_path, key, value, field, expected):
    path = write(tmp_path, "team.json", json.dumps(_mutate(MINIMAL, key, value)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert f"{field}: " in message
    assert expected in message
    assert info.value.field == field
    assert "\n" not in message and "pydantic" not in message.lower() and "errors.pydantic" not in message


def test_several_problems_are_listed_in_one_paragraph(tmp_path):
    doc = _mutate(_mutate(MINIMAL, "spec.confidence", 2.0), "search.iterations", 0)
    with pytest.raises(ConfigError) as info:
        load_config(write_doc(tmp_path, doc))
    message = str(info.value)
    assert "2 problems" in message and "spec.confidence" in message and "search.iterations" in message
    assert [p.field for p in info.value.problems] == ["spec.confidence", "search.iterations"]


def test_unknown_keys_list_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_doc(tmp_path, _mutate(MINIMAL, "spec.taux", 0.5)))
    assert "allowed keys: confidence, metric, recall, tau, tau_from_accuracy, worst_group" in str(info.value)
    assert "did you mean 'tau'" in str(info.value)


def test_files_form_needs_all_three_files(tmp_path):
    doc = {**MINIMAL, "data": {"train": "a.csv", "search": "b.csv"}}
    with pytest.raises(ConfigError, match=r"data\.certification: missing"):
        load_config(write_doc(tmp_path, doc))
    doc = {**MINIMAL, "data": {"train": "a.csv", "search": "b.csv", "certification": "c.csv", "split": {}}}
    with pytest.raises(ConfigError, match=r"data\.split: applies to data\.source or data\.loader"):
        load_config(write_doc(tmp_path, doc))


def test_loader_form_refuses_tabular_columns(tmp_path):
    doc = {**MINIMAL, "data": {"loader": {"function": "m:f"}, "label": "y"}}
    with pytest.raises(ConfigError, match=r"data\.label: applies to data files"):
        load_config(write_doc(tmp_path, doc))


def test_mlflow_model_needs_exactly_one_of_version_and_alias(tmp_path):
    doc = {**MINIMAL, "model": {"mlflow": {"name": "x", "version": "1", "alias": "champion"}}}
    with pytest.raises(ConfigError, match=r"model\.mlflow: expected exactly one of version or alias"):
        load_config(write_doc(tmp_path, doc))
    doc = {**MINIMAL, "model": {"mlflow": {"name": "x", "version": "v1"}}}
    with pytest.raises(ConfigError, match=r"model\.mlflow\.version: expected a registered version number"):
        load_config(write_doc(tmp_path, doc))
    doc = {**MINIMAL, "model": {"mlflow": {"name": "x", "alias": "champion"}, "weights": "w.safetensors"}}
    with pytest.raises(ConfigError, match=r"model\.weights: applies to model\.factory only"):
        load_config(write_doc(tmp_path, doc))


@pytest.mark.parametrize("version,expected", [(2, "got 2"), ("1", 'got "1"'), (None, "got null")])
def test_only_format_version_1_is_accepted(tmp_path, version, expected):
    path = write_doc(tmp_path, {**MINIMAL, "version": version})
    with pytest.raises(ConfigError, match=r"version: expected 1 .*" + expected) as info:
        load_config(path)
    assert str(path) in str(info.value)
    doc = dict(MINIMAL)
    del doc["version"]
    with pytest.raises(ConfigError, match=r"version: missing"):
        load_config(write_doc(tmp_path, doc))


@pytest.mark.parametrize("name,text,fragment", [
    ("bad.yaml", "version: 1\nname: [unclosed\n", "is not valid YAML at line"),
    ("bad.toml", "version = 1\nname = \n", "is not valid TOML"),
    ("bad.json", '{"version": 1,}', "is not valid JSON at line 1"),
    ("dup.yaml", "version: 1\nname: a\nname: b\n", "key 'name' appears twice in one mapping (line 3)"),
    ("dup.json", '{"version": 1, "version": 1}', "key 'version' appears twice"),
    ("list.yaml", "- 1\n- 2\n", "expected a mapping of sections at the top level"),
    ("empty.yaml", "", "expected a mapping of sections at the top level, got null"),
    ("date.yaml", "version: 1\nname: m\nmodel: {factory: 'a:b', kwargs: {when: 2024-01-01}}\n"
                  "data: {source: a.csv}\nspec: {tau: 0.5}\n", "model.kwargs.when: expected a JSON value"),
])
def test_unparsable_files_name_the_file(tmp_path, name, text, fragment):
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and fragment in str(info.value)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as info:
        load_config(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)
    with pytest.raises(ConfigError, match=r"expected a file ending in \.yaml, \.yml, \.toml, \.json"):
        load_config(write(tmp_path, "lidgate.ini", "x"))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml")


def test_parse_config_without_a_file():
    with pytest.raises(ConfigError, match=r"^configuration: spec\.tau"):
        parse_config(_mutate(MINIMAL, "spec.tau", -0.1))


def test_sections_validate_on_their_own():
    assert SpecSection(tau=0.5).threshold() == 0.5
    with pytest.raises(ValueError, match="needs the accuracy"):
        SpecSection(tau_from_accuracy=0.1).threshold()
    assert SpecSection(tau_from_accuracy=0.1).threshold(0.15) == pytest.approx(0.075)  # acc/2 floor
    assert SearchSection().search_config().iterations == 200
