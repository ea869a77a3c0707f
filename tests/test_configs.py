"""Every shipped DeepSpeed JSON loads and validates; the generator reproduces them; bad configs name the key."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import make_configs  # noqa: E402
from train_config import RunConfig, method_name  # noqa: E402

from localsgd_ds.config import ConfigError, check_engine  # noqa: E402

CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))
SWEEP = yaml.safe_load((ROOT / "recipes" / "sweep.yaml").read_text())


GPUS_PER_NODE = SWEEP["commit"]["nodes"]["gpus_per_node"]


def ranks_per_worker_of(config: dict) -> int:
    """GPUs per worker as a number ("node": the sweep's GPUs per node, what the file was written for)."""
    r = config["local_sgd"].get("ranks_per_worker", 1)
    return GPUS_PER_NODE if r == "node" else r


def world_size_of(config: dict) -> int:
    """The GPUs the file is launched on: K workers x GPUs per worker (2 for K = "auto")."""
    K = config["local_sgd"].get("K", "auto")
    return 2 if K == "auto" else K * ranks_per_worker_of(config)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path, monkeypatch):
    config = json.loads(path.read_text())
    K = world_size_of(config)
    r = ranks_per_worker_of(config)
    run = RunConfig.from_dict(config, world_size=K)
    # What attach resolves: "node" from the launcher's local world size, then K = world size / ranks per worker.
    hook = run.local_sgd.resolve(K, local_size=r)
    assert hook.ranks_per_worker == r and hook.K * r == K
    # Batch arithmetic: 32 per GPU x world size x accumulation; the lr follows the global batch.
    accum = config.get("gradient_accumulation_steps", 1)
    assert run.batch.global_batch == config["train_micro_batch_size_per_gpu"] * K * accum
    assert run.batch.global_batch == config.get("train_batch_size", run.batch.global_batch)  # cpu_*: no total

    # DeepSpeed's own parser accepts it at its world size (it asserts the batch arithmetic).
    from deepspeed.runtime import config as ds_config

    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: K)
    parsed = ds_config.DeepSpeedConfig(copy.deepcopy(run.deepspeed))
    assert parsed.train_batch_size == run.batch.global_batch
    assert parsed.optimizer_name == "SGD"
    assert parsed.zero_optimization_stage == 0


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("resnet")], ids=lambda p: p.name)
def test_file_name_says_model_method_H_K_T(path):
    config = json.loads(path.read_text())
    model, method, H, K, T = path.stem.split("_")
    local = config["local_sgd"]
    r = ranks_per_worker_of(config)
    assert config["train"]["model"] == model
    assert H == f"H{local['H']}" and K == (f"K{local['K']}" if r == 1 else f"K{local['K']}x{r}")
    assert T == f"T{'none' if local['T'] is None else local['T']}"
    assert local.get("ranks_per_worker", 1) in (1, "node")  # the shipped grid: a GPU or a node per worker
    assert (
        config["train_batch_size"] == 32 * local["K"] * r
    )  # 32 images per GPU x K workers x GPUs per worker
    if method.startswith("slowmo"):
        assert method == f"slowmo-beta{local['slowmo']['beta']:g}" and local["T"] == 0
    else:
        assert "slowmo" not in local
        expected_T = {"msgd": None, "local": 0}.get(method, local["T"])
        assert local["T"] == expected_T and (method != "postlocal" or local["T"] >= 1)


def test_the_committed_grid_is_complete():
    names = {p.stem for p in CONFIGS}
    for model in ("resnet50", "resnet101"):
        for K in (16, 64):
            assert f"{model}_msgd_H1_K{K}_Tnone" in names
            for H in (2, 4, 8, 16, 32):
                assert f"{model}_local_H{H}_K{K}_T0" in names
            for H in (8, 16):
                for T in (5, 30, 60):
                    assert f"{model}_postlocal_H{H}_K{K}_T{T}" in names
                assert any(
                    n.startswith(f"{model}_slowmo-beta") and n.endswith(f"_H{H}_K{K}_T0") for n in names
                )
    assert {"cpu_msgd", "cpu_local", "cpu_postlocal", "cpu_slowmo"} <= names
    # Workers that are nodes: K = 8 and 16 nodes x 8 GPUs for ResNet-50, with their mSGD baselines.
    for K in (8, 16):
        for H in (4, 8, 16, 32):
            assert f"resnet50_local_H{H}_K{K}x8_T0" in names
        assert f"resnet50_postlocal_H8_K{K}x8_T30" in names
        assert f"resnet50_msgd_H1_K{K * 8}_Tnone" in names


@pytest.mark.parametrize(("K", "world", "batch", "lr"), [(8, 64, 2048, 0.8), (16, 128, 4096, 1.6)])
def test_node_workers_count_workers_and_gpus_apart(K, world, batch, lr):
    """32 per GPU x 8 GPUs x K nodes: the batch and the lr follow the GPUs, K (and H x K) the nodes; the
    same global batch and lr as the one-GPU-per-worker file of that world size."""
    node = json.loads((ROOT / "ds_configs" / f"resnet50_local_H8_K{K}x8_T0.json").read_text())
    gpu = make_configs.config_for(make_configs.Point("resnet50", "local", 8, world, 0), SWEEP)
    assert node["local_sgd"]["ranks_per_worker"] == "node" and "ranks_per_worker" not in gpu["local_sgd"]
    run = RunConfig.from_dict(node, world_size=world)
    assert run.batch.global_batch == node["train_batch_size"] == batch
    assert run.train.lr_schedule.peak_lr(batch) == pytest.approx(lr)
    hook = run.local_sgd.resolve(world, local_size=8)
    assert (hook.K, hook.ranks_per_worker, hook.H * hook.K) == (K, 8, 8 * K)
    # Everything but the split is the GPU-worker file's.
    for config in (node, gpu):
        config["local_sgd"].pop("ranks_per_worker", None)
        config["local_sgd"].pop("K")
    assert node == gpu
    with pytest.raises(ConfigError, match="local_sgd.K = "):  # launched on the wrong number of nodes
        run.local_sgd.resolve(world, local_size=4)


def test_generator_reproduces_the_committed_files():
    assert make_configs.main(["--check"]) == 0
    readme = (ROOT / "ds_configs" / "README.md").read_text()
    assert "32 per GPU x 64 GPUs x 1 = 2048" in readme and "`resnet101_postlocal_H16_K64_T60.json`" in readme
    assert "# 32 per GPU x 8 GPUs x 8 nodes = 2048" in readme and "lr = 0.1 * 2048 / 256" in readme
    assert "32 per GPU x 8 GPUs x 16 nodes x 1 = 4096" in readme
    assert "`resnet50_local_H8_K8x8_T0.json` | resnet50 | local | 8 | 8 | 8 (node) | 0 |  | 2048 |" in readme


def test_generator_writes_any_point_on_demand(tmp_path):
    assert (
        make_configs.main(
            [
                "--model",
                "resnet101",
                "--method",
                "postlocal",
                "--H",
                "4",
                "--K",
                "128",
                "--T",
                "30",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "resnet101_postlocal_H4_K128_T30.json").read_text())
    run = RunConfig.from_dict(config, world_size=128)
    assert (run.local_sgd.H, run.local_sgd.K, run.local_sgd.T) == (4, 128, 30)
    assert run.batch.global_batch == 4096 and run.train.lr_schedule.peak_lr(4096) == pytest.approx(1.6)

    points = make_configs.all_points(SWEEP)
    assert len(points) == 2 * 6 * (1 + 5 + 5 * 3 + 5 * 3)  # models x K x (msgd, local, postlocal, slowmo)
    assert {p.world_size for p in make_configs.all_points(SWEEP, "node", 8)} == {
        8 * K for K in SWEEP["workers"]
    }
    with pytest.raises(SystemExit):
        make_configs.main(
            ["--model", "resnet50", "--method", "local", "--H", "1", "--K", "8", "--out", str(tmp_path)]
        )


@pytest.mark.parametrize(
    ("ranks", "name", "world", "written"),
    [
        (["--ranks-per-worker", "node"], "resnet50_local_H8_K32x8_T0", 256, "node"),
        (["--ranks-per-worker", "node", "--gpus-per-node", "4"], "resnet50_local_H8_K32x4_T0", 128, "node"),
        (["--ranks-per-worker", "2"], "resnet50_local_H8_K32x2_T0", 64, 2),
        ([], "resnet50_local_H8_K32_T0", 32, None),
    ],
)
def test_generator_ranks_per_worker(tmp_path, ranks, name, world, written):
    args = ["--model", "resnet50", "--method", "local", "--H", "8", "--K", "32", "--out", str(tmp_path)]
    assert make_configs.main(args + ranks) == 0
    config = json.loads((tmp_path / f"{name}.json").read_text())
    assert config["local_sgd"].get("ranks_per_worker") == written
    assert config["train_batch_size"] == 32 * world  # 32 per GPU x world size
    run = RunConfig.from_dict(config, world_size=world)
    assert run.local_sgd.resolve(world, local_size=world // 32).K == 32
    with pytest.raises(SystemExit):
        make_configs.main(args + ["--ranks-per-worker", "0"])


def cpu_config() -> dict:
    return json.loads((ROOT / "ds_configs" / "cpu_postlocal.json").read_text())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["train"].update(epochs=0), "train.epochs"),
        (lambda c: c["train"].update(modle="resnet8"), r"unknown key\(s\) \['modle'\]"),
        (lambda c: c["train"].update(model="vgg"), "train.model"),
        (lambda c: c["train"]["lr_schedule"].update(decay="poly"), "train.lr_schedule.decay"),
        (lambda c: c.update(scheduler={"type": "WarmupLR", "params": {}}), "scheduler"),
        (lambda c: c["optimizer"]["params"].update(lr=0.1), "optimizer.params.lr"),
        (lambda c: c.update(train_batch_size=100), "train_batch_size"),
        (lambda c: c["local_sgd"].update(K=8), "local_sgd.K"),
        (lambda c: c.pop("optimizer"), "optimizer"),
        (lambda c: c["train"]["data"].update(val_crop=64), "train.data.val_crop = 64 is larger than"),
        (lambda c: c["train"]["data"].update(num_workers=-1), "train.data.num_workers must be"),
        (lambda c: c["train"]["data"].update(workers=2), r"train.data: unknown key\(s\) \['workers'\]"),
        (lambda c: c["train"].update(lr_schedule={"decay": "step", "milestones": [3, 20]}), "milestones"),
    ],
)
def test_bad_configs_name_the_key(edit, message):
    config = cpu_config()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_dict(config, world_size=2)


class ParsedEngine:
    """What localsgd_ds.attach asks of the engine (check_engine), answered by DeepSpeed's own parse of the
    JSON the recipe hands to deepspeed.initialize."""

    def __init__(self, ds_json: dict, world_size: int, monkeypatch) -> None:
        from deepspeed.runtime import config as ds_config

        monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
        monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: world_size)
        self.config = ds_json
        self._parsed = ds_config.DeepSpeedConfig(copy.deepcopy(ds_json))

    # The engine's own accessors (deepspeed/runtime/engine.py), over the same parse.
    def zero_optimization_stage(self) -> int:
        return self._parsed.zero_optimization_stage

    def fp16_enabled(self) -> bool:
        return self._parsed.float16_config.enabled

    def bfloat16_enabled(self) -> bool:
        return self._parsed.bfloat16_config.enabled


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(zero_optimization={"stage": 1}), "zero_optimization.stage = 1"),
        (lambda c: c.update(bf16={"enabled": True}), "bf16.enabled = true"),
        (lambda c: c.update(fp16={"enabled": True}), "fp16.enabled = true"),
    ],
)
def test_what_the_engine_would_run_is_refused_at_attach_by_key(edit, message, monkeypatch):
    """The recipe leaves these to attach(config=run.local_sgd), which asks the engine: the same JSON, as
    DeepSpeed parses it, is refused by key; the shipped config itself is not."""
    run = RunConfig.from_dict(cpu_config(), world_size=2)
    check_engine(ParsedEngine(run.deepspeed, 2, monkeypatch), run.local_sgd)
    config = cpu_config()
    edit(config)
    run = RunConfig.from_dict(config, world_size=2)
    with pytest.raises(ConfigError, match=message):
        check_engine(ParsedEngine(run.deepspeed, 2, monkeypatch), run.local_sgd)


@pytest.mark.parametrize(
    "key", ["num_workers", "image_size", "crop_scale", "hflip", "val_resize", "val_crop", "eval_batch_size"]
)
def test_a_loader_option_in_its_old_place_says_where_it_moved(key):
    config = cpu_config()
    data = config["train"].pop("data")
    config["train"][key] = data.get(key)
    with pytest.raises(ConfigError, match=rf"train\.{key} has moved to train\.data\.{key}"):
        RunConfig.from_dict(config, world_size=2)


def test_the_data_block_is_the_loaders_config():
    run = RunConfig.from_dict(cpu_config(), world_size=2)
    assert (run.train.data.num_workers, run.train.data.image_size, run.train.data.crop_scale) == (
        1,
        16,
        (0.35, 1.0),
    )
    assert not run.train.data.hflip and run.train.data.eval_batch_size is None
    assert run.resolved()["train"]["data"] == {**run.train.data.to_dict(), "crop_scale": [0.35, 1.0]}


def test_deepspeed_scheduler_is_the_other_home_of_the_lr():
    config = cpu_config()
    del config["train"]["lr_schedule"]
    config["optimizer"]["params"]["lr"] = 0.05
    config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}
    run = RunConfig.from_dict(config, world_size=2)
    assert run.train.lr_schedule is None
    assert run.resolved()["train"]["lr_schedule"] is None


def test_resolved_config_fills_defaults_and_reloads():
    config = cpu_config()
    run = RunConfig.from_dict(config, world_size=2)
    resolved = run.resolved()
    assert resolved["local_sgd"]["K"] == 2 and resolved["local_sgd"]["slowmo"] is None
    assert resolved["train"]["seed"] == 0 and resolved["train"]["lr_schedule"]["gamma"] == 0.1
    assert RunConfig.from_dict(json.loads(json.dumps(resolved)), world_size=2) == run
    assert method_name(run.local_sgd) == "postlocal"


# -- pyproject.toml: the install commands of the README install what the code imports ----------------------


def _imported_distributions(paths: list[Path]) -> dict[str, str]:
    """Third-party distributions the files import (anywhere, lazy imports too) -> one file importing it."""
    import ast
    import importlib.metadata

    module_dists = importlib.metadata.packages_distributions()
    local = {p.stem for folder in ("tests", "recipes", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    found = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        optional = {  # imports guarded by `except ImportError` (a fallback or a "pip install x" message)
            id(node)
            for guard in ast.walk(tree)
            if isinstance(guard, ast.Try)
            and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in guard.handlers
            )
            for part in [*guard.body, *guard.handlers]
            for node in ast.walk(part)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in local or top in ("localsgd_ds", "data_prep"):
                    continue
                assert top in module_dists, f"{path.relative_to(ROOT)} imports {top}, which is not installed"
                for dist in module_dists[top]:
                    found.setdefault(_canonical(dist), str(path.relative_to(ROOT)))
    return found


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _installed_closure(requirements: list[str]) -> set[str]:
    """The distributions ``pip install`` brings for these requirements: them and their own requirements."""
    import importlib.metadata

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in seen or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
    return seen


def _project() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _recipe_files(*entries: str) -> list[Path]:
    """The recipes ``entries`` and the recipes/ modules they import, transitively."""
    import ast

    todo, seen = [ROOT / "recipes" / name for name in entries], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            todo += [ROOT / "recipes" / f"{n}.py" for n in names if (ROOT / "recipes" / f"{n}.py").is_file()]
    return sorted(seen)


def _library_files() -> list[Path]:
    return sorted((ROOT / "localsgd_ds").rglob("*.py")) + sorted((ROOT / "data_prep").rglob("*.py"))


@pytest.mark.parametrize(
    ("extra", "files"),
    [
        # python recipes/quickstart.py: the quickstart, the recipe it launches, data_prep, the library.
        ("demo", lambda: _recipe_files("quickstart.py", "train_imagenet.py") + _library_files()),
        # python recipes/study.py: the study runner and its report, the recipe it launches.
        (
            "study",
            lambda: _recipe_files("study.py", "study_report.py", "train_imagenet.py") + _library_files(),
        ),
        # python -m pytest: the tests and everything they run (the benchmarks' smoke test included).
        (
            "test",
            lambda: (
                [p for d in ("tests", "benchmarks", "recipes") for p in sorted((ROOT / d).glob("*.py"))]
                + _library_files()
            ),
        ),
    ],
)
def test_install_extras_cover_every_import(extra, files):
    project = _project()
    installed = _installed_closure(project["dependencies"] + project["optional-dependencies"][extra])
    missing = {
        dist: where for dist, where in _imported_distributions(files()).items() if dist not in installed
    }
    assert not missing, f'pip install -e ".[{extra}]" does not install what these files import: {missing}'
