"""params.yaml -> typed config: profiles apply, and every kind of bad input names its key."""

import io
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from pipeline.config import data_root
from pipeline.errors import ConfigError
from stages._params import Params, load_params

REPO = Path(__file__).resolve().parents[1]


def write_params(tmp_path: Path, edit) -> Path:
    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    buffer = io.StringIO()
    YAML(typ="safe").dump(raw, buffer)
    path.write_text(buffer.getvalue())
    return path


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_every_profile_of_the_shipped_params_loads(tmp_path, profile):
    params = load_params(write_params(tmp_path, lambda raw: raw.update(profile=profile)))
    assert isinstance(params, Params)
    assert params.profile == profile


def test_profile_overrides_apply(tmp_path):
    smoke = load_params(write_params(tmp_path, lambda raw: raw.update(profile="smoke")))
    quick = load_params(write_params(tmp_path, lambda raw: raw.update(profile="quick")))
    assert smoke.data.dataset == "synthetic"
    assert quick.data.dataset == "cifar10"
    assert smoke.teacher.epochs < quick.teacher.epochs


def test_configs_are_frozen():
    params = load_params(REPO / "params.yaml")
    with pytest.raises(Exception, match="frozen|cannot assign"):
        params.teacher.lr = 1.0  # type: ignore[misc]


def test_float_with_bare_exponent_reads_as_number(tmp_path):
    path = write_params(tmp_path, lambda raw: None)
    path.write_text(path.read_text().replace("weight_decay: 0.0005", "weight_decay: 5e-4"))
    assert load_params(path).teacher.weight_decay == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda raw: raw["teacher"].update(colour="red"), r"teacher\.colour: unknown key"),
        (lambda raw: raw["teacher"].pop("lr"), r"teacher\.lr: missing key"),
        (lambda raw: raw["teacher"].update(lr="fast"), r"teacher\.lr: .*valid number"),
        (lambda raw: raw["teacher"].update(lr=-0.1), r"teacher\.lr: .*greater than 0"),
        (lambda raw: raw["teacher"].update(epochs=2.5), r"teacher\.epochs: .*integer"),
        (lambda raw: raw["data"].update(dataset="mnist"), r"data\.dataset: "),
        (lambda raw: raw["teacher"].update(arch="resnet9"),
         r"teacher\.arch: unknown architecture 'resnet9'"),
        (lambda raw: raw["distill"].update(student_arch="resnet9"),
         r"distill\.student_arch: unknown architecture 'resnet9'"),
        (lambda raw: raw.update(teacher=5), r"teacher: expected a mapping of keys \(got 5\)"),
        (lambda raw: raw["runtimes"]["onnxruntime"].update(intra_op_threads=-1),
         r"runtimes\.onnxruntime\.intra_op_threads: .*greater than or equal to 0"),
        (lambda raw: raw["runtimes"].update(tpu={}), r"runtimes\.tpu: unknown runtime"),
        (lambda raw: raw["runtimes"].pop("ssh"), r"runtimes\.ssh: missing section"),
        (lambda raw: raw["benchmark"]["targets"].update({"torch-cpu": ["fp32", "int8"]}),
         r"benchmark\.targets\.torch-cpu: target does not support \['int8'\]"),
        (lambda raw: raw["benchmark"]["targets"].update(tpu=["fp32"]),
         r"benchmark\.targets\.tpu: unknown target"),
        (lambda raw: raw.update(extra={}), r"extra: unknown section"),
        (lambda raw: raw.pop("common"), r"common: missing section"),
        (lambda raw: raw.update(profile="huge"), r"profile: expected one of"),
        (lambda raw: raw["profiles"]["quick"].update(data={"colour": 1}),
         r"profiles\.quick\.data\.colour: unknown key"),
        (lambda raw: raw["teacher"].update(schedule="multistep", milestones=[99]),
         r"milestone 99 is not before epochs"),
        (lambda raw: raw["student_dense"].update(epochs=99),
         r"student_dense\.epochs: \(99\) must equal student_gated\.epochs \+ "
         r"student_final\.epochs"),
        (lambda raw: raw["student_gated"].update(flops_target=0.5),
         r"flops_target and flops_weight switch the MACs budget on together"),
        (lambda raw: raw["student_slim"].update(round_to=0),
         r"student_slim\.round_to: .*greater than or equal"),
        (lambda raw: raw["common"].pop("distributed"), r"common\.distributed: missing key"),
        (lambda raw: raw["common"]["distributed"].update(nproc_per_node=3),
         r"teacher\.batch_size: \(128\) must be a multiple of the 3 training processes"),
        (lambda raw: raw["common"]["distributed"].update(nnodes=2),
         r"common\.distributed: nnodes=2 needs rdzv_endpoint"),
        (lambda raw: raw["common"]["distributed"].update(rdzv_endpoint="node0"),
         r"common\.distributed: rdzv_endpoint must be host:port"),
        # Cross-section references: models the pipeline makes, reported models benchmarked.
        (lambda raw: raw["benchmark"].update(models=["teacher", "student_gated"]),
         r"benchmark\.models: 'student_gated' is not a model the pipeline makes; known: "
         r"teacher, student_dense, student_final"),
        (lambda raw: raw["benchmark"].update(models=["teacher", "teacher", "student_dense",
                                                     "student_final"]),
         r"benchmark\.models: 'teacher' is listed more than once"),
        (lambda raw: raw["report"].update(pruned_model="student_slim"),
         r"report\.pruned_model: 'student_slim' is not in benchmark\.models \(teacher, "
         r"student_dense, student_final\)"),
        (lambda raw: raw["benchmark"].update(models=["student_dense", "student_final"]),
         r"report\.baseline_model: 'teacher' is not in benchmark\.models"),
        # Every profile and the base sections, not only the merged result of the active one.
        (lambda raw: raw["profiles"]["paper"]["teacher"].update(lr=-1.0),
         r"teacher\.lr: .*greater than 0 \(got -1\.0\) \[set by profiles\.paper\]"),
        (lambda raw: raw["profiles"]["smoke"].update(data={"dataset": "mnist"}),
         r"data\.dataset: .*\[set by profiles\.smoke\]"),
        (lambda raw: raw["profiles"]["paper"]["student_final"].update(epochs=160),
         r"student_dense\.epochs: \(200\) must equal .*\(210\).*\[set by profiles\.paper\]"),
    ],
)
def test_bad_params_name_the_key_and_the_file(tmp_path, edit, message):
    path = write_params(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as caught:
        load_params(path)
    assert str(path) in str(caught.value)


def test_error_from_a_profile_says_so(tmp_path):
    def edit(raw):
        raw["profile"] = "smoke"
        raw["profiles"]["smoke"]["teacher"]["lr"] = -1.0

    with pytest.raises(ConfigError, match=r"teacher\.lr: .*\[set by profiles\.smoke\]"):
        load_params(write_params(tmp_path, edit))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "nope.yaml")


def test_a_relative_data_root_is_relative_to_the_repository_dvc_runs(monkeypatch):
    """A queued experiment runs in a copy under .dvc/tmp/exps/; DVC names the repository in
    DVC_ROOT, and a relative root (from params or the environment) is taken from there."""
    data = load_params(REPO / "params.yaml").data
    monkeypatch.setenv("DVC_ROOT", "/work/repo")
    monkeypatch.setenv("PIPELINE_DATA_ROOT", "../shared/data")
    assert data_root(data) == Path("/work/repo/../shared/data")
    monkeypatch.delenv("PIPELINE_DATA_ROOT")
    assert data_root(data) == Path("/work/repo") / data.root
    monkeypatch.setenv("PIPELINE_DATA_ROOT", "/data/cifar")
    assert data_root(data) == Path("/data/cifar")
    monkeypatch.delenv("DVC_ROOT")  # a stage run by hand: relative to the working directory
    monkeypatch.setenv("PIPELINE_DATA_ROOT", "../shared/data")
    assert data_root(data) == Path("../shared/data")
def test_a_base_value_the_active_profile_overrides_must_still_be_valid(tmp_path):
    def edit(raw):
        raw["profile"] = "smoke"  # smoke sets data.synthetic_test: 128
        raw["data"]["synthetic_test"] = 0

    with pytest.raises(ConfigError, match=r"data\.synthetic_test: .*greater than or equal to 1 "
                                          r"\(got 0\) \[base value; profiles\.smoke overrides "
                                          r"it"):
        load_params(write_params(tmp_path, edit))


def test_each_problem_is_reported_once(tmp_path):
    path = write_params(tmp_path, lambda raw: raw["common"].update(seed=-1))
    with pytest.raises(ConfigError) as caught:
        load_params(path)  # the same bad seed in the base and under every profile
    assert str(caught.value).count("common.seed") == 1


def test_the_pipeline_models_are_the_exported_ones():
    from stages._params import PIPELINE_MODELS

    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages["export"]["foreach"]) == PIPELINE_MODELS
