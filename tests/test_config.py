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


def switch_to(profile: str):
    """An edit that selects `profile` the way a user must: with the method list it names, since
    dvc.yaml builds one chain per method from the list written at the top of the file."""
    def edit(raw):
        raw["profile"] = profile
        listed = (raw["profiles"][profile] or {}).get("prune", {}).get("methods")
        if listed is not None:
            raw["prune"]["methods"] = listed
    return edit


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_every_profile_of_the_shipped_params_loads(tmp_path, profile):
    params = load_params(write_params(tmp_path, switch_to(profile)))
    assert isinstance(params, Params)
    assert params.profile == profile


def test_a_profile_cannot_change_the_stages_dvc_builds(tmp_path):
    def edit(raw):
        raw["profile"] = "smoke"
        raw["profiles"]["smoke"]["prune"] = {"methods": ["pdd", "kddp"]}

    with pytest.raises(ConfigError, match=r"prune\.methods: profiles\.smoke sets .* dvc\.yaml "
                       r"builds its stages from the value written at the top of the file .*"
                       r"dvc exp run -S profile=smoke -S 'prune\.methods=\[pdd,kddp\]'"):
        load_params(write_params(tmp_path, edit))


def test_profile_overrides_apply(tmp_path):
    smoke = load_params(write_params(tmp_path, switch_to("smoke")))
    quick = load_params(write_params(tmp_path, switch_to("quick")))
    assert smoke.data.dataset == "synthetic"
    assert quick.data.dataset == "cifar10"
    assert smoke.teacher.epochs < quick.teacher.epochs


def test_no_shipped_profile_sets_a_key_dvc_builds_stages_from():
    """So `dvc exp run -S profile=<any>` works as it is; all six methods are one more -S."""
    from stages._params import STAGE_KEYS

    raw = YAML(typ="safe").load((REPO / "params.yaml").read_text())
    for name, profile in raw["profiles"].items():
        for section, key in STAGE_KEYS:
            assert key not in ((profile or {}).get(section) or {}), (name, section, key)


def test_quick_runs_a_subset_of_the_methods():
    from pipeline.config import METHOD_NAMES

    quick = load_params(REPO / "params.yaml")
    assert quick.profile == "quick" and set(quick.prune.methods) < set(METHOD_NAMES)
    assert len(METHOD_NAMES) == 6


def test_null_target_means_each_method_at_its_own_size(tmp_path):
    params = load_params(write_params(tmp_path, lambda raw: raw["prune"].update(
        budget=None)))
    assert params.prune.target_macs is None
    assert params.method_settings("netslim")[0].target_macs is None


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
         r"student_dense\.epochs: \(99\) must equal student_pruned\.epochs \+ "
         r"student_final\.epochs"),
        (lambda raw: raw["pdd"].update(flops_target=0.5),
         r"flops_target and flops_weight switch the MACs budget on together"),
        # the pruning methods: refused before any stage runs
        (lambda raw: raw["prune"].update(methods=["pdd", "magic"]),
         r"prune\.methods\.1: Input should be 'pdd', 'kddp', 'prune_then_kd', 'sdap', "
         r"'netslim' or 'weight' \(got 'magic'\)"),
        (lambda raw: raw["prune"].update(methods=["pdd", "pdd"]),
         r"prune\.methods: each method may be listed once"),
        (lambda raw: raw["prune"].update(methods=[]), r"prune\.methods: .*at least 1"),
        (lambda raw: raw["prune"].update(target_macs=0.5),
         r"prune\.target_macs: unknown key \(replaced by prune\.budget: \{macs: "),
        (lambda raw: raw["prune"].update(budget={"macs": 0.0}),
         r"prune\.budget\.MacsBudget\.macs: Input should be greater than 0"),
        (lambda raw: raw["prune"].update(budget={"macs": 1.2}),
         r"prune\.budget\.MacsBudget\.macs: Input should be less than or equal to 1"),
        (lambda raw: raw["prune"].update(budget={"latency_ms": 5.0, "target": "torch-cpu",
                                                 "precision": "fp32", "batch": 64}),
         r"prune\.budget\.target: 'torch-cpu': tables are built for latency\.target"),
        (lambda raw: raw["prune"].update(budget={"latency_ms": 5.0, "target": "onnxruntime-cpu",
                                                 "precision": "fp32", "batch": 64}),
         r"student_slim\.widths: 'round_to': a latency budget"),
        (lambda raw: raw["latency"].update(target="torch-cpu"),
         r"latency\.target: 'torch-cpu' runs checkpoint files"),
        (lambda raw: raw["distill"].update(student_arch="vgg11"),
         r"latency\.sweep_widths: vgg11 cannot be built at another base width"),
        (lambda raw: raw["latency"].update(select_batch=8),
         r"latency\.select_batch: 8 is not one of latency\.batch_sizes"),
        (lambda raw: raw["weight"].update(sparsity=1.0),
         r"weight\.sparsity: Input should be less than 1"),
        (lambda raw: raw["weight"].update(sparsity=-0.1),
         r"weight\.sparsity: Input should be greater than or equal to 0"),
        (lambda raw: raw["netslim"].update(normalize="max"), r"netslim\.normalize: "),
        (lambda raw: raw["prune"].update(methods=["sdap"]) or raw["sdap"].update(
            pretrain_epochs=3), r"sdap\.pretrain_epochs: \(3\) must be below student_pruned"),
        (lambda raw: raw["benchmark"].update(models=["teacher", "student_dense",
                                                     "student_final_pdd"]),
         r"benchmark\.models: 'student_final_pdd' is not a reference model.*benchmarked "
         r"because prune\.methods lists their methods"),
        (lambda raw: raw["benchmark"].update(models=["teacher"]),
         r"report\.dense_model: 'student_dense' is not benchmarked"),
        (lambda raw: raw["report"].update(chart_target="torch-cuda-graphs") or
         raw["benchmark"]["targets"].pop("torch-cuda-graphs"),
         r"report\.chart_target: 'torch-cuda-graphs' is not benchmarked"),
        (lambda raw: raw["student_slim"].update(round_to=0),
         r"student_slim\.round_to: .*greater than or equal"),
        (lambda raw: raw["common"].pop("distributed"), r"common\.distributed: missing key"),
        (lambda raw: raw["common"]["distributed"].update(nproc_per_node=3),
         r"teacher\.batch_size: \(128\) must be a multiple of the 3 training processes"),
        (lambda raw: raw["common"]["distributed"].update(nnodes=2),
         r"common\.distributed: nnodes=2 needs rdzv_endpoint"),
        (lambda raw: raw["common"]["distributed"].update(rdzv_endpoint="node0"),
         r"common\.distributed: rdzv_endpoint must be host:port"),
        # Cross-section references: reference models only, reported models benchmarked.
        (lambda raw: raw["benchmark"].update(models=["teacher", "student_gated"]),
         r"benchmark\.models: 'student_gated' is not a reference model; expected some of "
         r"\['teacher', 'student_dense'\]"),
        (lambda raw: raw["benchmark"].update(models=["teacher", "teacher", "student_dense"]),
         r"benchmark\.models: 'teacher' is listed more than once"),
        (lambda raw: raw["report"].update(dense_model="student_slim"),
         r"report\.dense_model: 'student_slim' is not benchmarked"),
        (lambda raw: raw["benchmark"].update(models=["student_dense"]),
         r"report\.baseline_model: 'teacher' is not benchmarked"),
        (lambda raw: raw["engine"].update(models=["student_final_pdd"]),
         r"engine\.models: 'student_final_pdd' is not a reference model"),
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
        switch_to("smoke")(raw)
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


def test_every_export_stage_makes_the_references_and_each_methods_student():
    stages = YAML(typ="safe").load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in ("export", "export_openvino", "export_executorch"):
        assert stages[stage]["foreach"] == "${benchmark.models}", stage
        assert stages[f"{stage}_student_final"]["foreach"] == "${prune.methods}", stage
        assert "--name student_final_${item}" in stages[f"{stage}_student_final"]["do"]["cmd"]
