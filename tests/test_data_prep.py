"""data_prep: the digits generator, layouts, sharding (local and on a real SeaweedFS S3 server),
bad inputs, resumability after a real SIGKILL, and ``verify``. Real JPEGs everywhere, no mocks."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3_server import SECRET_KEY, s3_server  # noqa: F401 - the module-scoped server fixture

from data_prep.layout import LayoutError, discover
from data_prep.shard import BadImageError, ShardingError, shard_dataset
from data_prep.staging import Staging
from data_prep.synthetic import make_digits_imagefolder, make_photo_imagefolder, wnid, write_edge_cases
from data_prep.verify import verify_shards

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_digits_imagefolder(
        tmp_path_factory.mktemp("digits"), image_size=32, train_per_class=12, val_per_class=4
    )


# ============================================================================================ generator
def test_digits_generator_writes_real_jpegs_in_imagenet_layout(tmp_path):
    start = time.perf_counter()
    root = make_digits_imagefolder(
        tmp_path / "d", image_size=48, train_per_class=30, val_per_class=10, seed=3
    )
    assert time.perf_counter() - start < 10
    for split, per_class in (("train", 30), ("val", 10)):
        assert sorted(p.name for p in (root / split).iterdir()) == [wnid(k) for k in range(10)]
        files = sorted((root / split).glob("*/*.JPEG"))
        assert len(files) == 10 * per_class
        with Image.open(files[0]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (48, 48))
    # Deterministic for a seed, different across seeds; colours vary, so colour is no shortcut.
    again = make_digits_imagefolder(
        tmp_path / "e", image_size=48, train_per_class=30, val_per_class=10, seed=3
    )
    f = "train/n00000004/n00000004_0007.JPEG"
    assert (root / f).read_bytes() == (again / f).read_bytes()
    other = make_digits_imagefolder(tmp_path / "f", image_size=48, train_per_class=2, val_per_class=1, seed=4)
    assert (root / "train/n00000000/n00000000_0000.JPEG").read_bytes() != (
        other / "train/n00000000/n00000000_0000.JPEG"
    ).read_bytes()
    means = [
        np.asarray(Image.open(p)).reshape(-1, 3).mean(0) for p in sorted((root / "train" / wnid(1)).glob("*"))
    ]
    assert np.std(means, axis=0).min() > 20


def test_cli_synthetic_and_help_show_real_examples(tmp_path):
    out = run_cli(
        "synthetic",
        "--out",
        str(tmp_path / "s"),
        "--image-size",
        "32",
        "--train-per-class",
        "3",
        "--val-per-class",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert "wrote 50 JPEGs" in out.stdout
    assert len(list((tmp_path / "s").glob("*/*/*.JPEG"))) == 50
    help_text = run_cli("shard", "--help").stdout
    for needle in (
        "python -m data_prep shard --src",
        "s3://",
        "--samples-per-shard",
        "LOC_val_solution.csv",
        "--resize-short-side",
    ):
        assert needle in help_text
    assert "python -m data_prep verify" in run_cli("--help").stdout


# ============================================================================================ layouts
def _flat_val(root: Path, digits: Path) -> list[tuple[str, str]]:
    """Copy digits' val images into a flat ROOT/val as ILSVRC2012_val_%08d.JPEG; returns (name, wnid)."""
    (root / "val").mkdir(parents=True)
    pairs = []
    for i, path in enumerate(sorted((digits / "val").glob("*/*.JPEG")), start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (root / "val" / name).write_bytes(path.read_bytes())
        pairs.append((name, path.parent.name))
    return pairs


def test_layout_kaggle_csv(tmp_path, digits):
    root = tmp_path / "kaggle"
    pairs = _flat_val(root, digits)
    (root / "train").symlink_to(digits / "train")
    rows = ["ImageId,PredictionString"] + [f"{Path(n).stem},{w} 1 2 30 31 {w} 4 4 20 20" for n, w in pairs]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    source = discover(root)
    assert source.splits["val"].layout == "Kaggle LOC_val_solution.csv"
    labels = {Path(s.relpath).name: source.classes[s.label] for s in source.splits["val"].samples}
    assert labels == dict(pairs)
    assert len(source.splits["train"].samples) == 120


def test_layout_kaggle_download_tree(tmp_path, digits):
    root = tmp_path / "imagenet-object-localization-challenge"
    data = root / "ILSVRC" / "Data" / "CLS-LOC"
    pairs = _flat_val(data, digits)
    (data / "train").symlink_to(digits / "train")
    rows = ["ImageId,PredictionString"] + [f"{Path(n).stem},{w} 1 2 3 4" for n, w in pairs]
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    source = discover(root)
    assert {Path(s.relpath).name: source.classes[s.label] for s in source.splits["val"].samples} == dict(
        pairs
    )


def test_layout_devkit_ground_truth(tmp_path, digits):
    scipy_io = pytest.importorskip("scipy.io")
    root = tmp_path / "devkit"
    pairs = _flat_val(root, digits)
    (root / "train").symlink_to(digits / "train")
    # meta.mat numbers synsets in its own order (ILSVRC2012_ID), not in sorted-wnid order: reverse it.
    wnids = [wnid(k) for k in range(10)]
    ids = {w: 10 - k for k, w in enumerate(wnids)}
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    synsets = np.array([(ids[w], w, f"digit {w}", 0) for w in wnids], dtype=dtype)
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    scipy_io.savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for _, w in pairs))
    source = discover(root)
    assert source.splits["val"].layout.startswith("devkit")
    assert {Path(s.relpath).name: source.classes[s.label] for s in source.splits["val"].samples} == dict(
        pairs
    )


def test_layout_errors_say_what_was_expected(tmp_path, digits):
    (tmp_path / "nothing" / "images").mkdir(parents=True)
    with pytest.raises(LayoutError) as err:
        discover(tmp_path / "nothing")
    assert "ROOT/train/<class>/*.JPEG" in str(err.value) and "LOC_val_solution.csv" in str(err.value)
    flat = tmp_path / "flat"
    _flat_val(flat, digits)
    with pytest.raises(LayoutError, match="no labels: expected LOC_val_solution.csv"):
        discover(flat)
    stray = tmp_path / "stray"
    (stray / "train" / "cat").mkdir(parents=True)
    (stray / "val" / "dog").mkdir(parents=True)
    (stray / "train" / "cat" / "a.JPEG").write_bytes(
        (digits / "train/n00000000/n00000000_0000.JPEG").read_bytes()
    )
    (stray / "val" / "dog" / "b.JPEG").write_bytes(
        (digits / "train/n00000000/n00000000_0000.JPEG").read_bytes()
    )
    with pytest.raises(LayoutError, match="class 'dog' is not among the 1 training classes"):
        discover(stray)
    out = run_cli("shard", "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"))
    assert out.returncode == 1 and "expected one of" in out.stderr


# ============================================================================================ sharding
def test_shard_local_contract(tmp_path, digits):
    out = tmp_path / "shards"
    report = shard_dataset(digits, out, samples_per_shard=25, workers=2, seed=7, progress=False)
    assert json.loads((out / "classes.json").read_text()) == [wnid(k) for k in range(10)]
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 120 and manifest["num_shards"] == 5 and manifest["num_classes"] == 10
    assert [s["name"] for s in manifest["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in manifest["shards"]] == [25, 25, 25, 25, 20]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["manifest.json"] + [
        f"train-{i:06d}.tar" for i in range(5)
    ]
    sources = {f"{p.parent.name}/{p.stem}": p for p in (digits / "train").glob("*/*.JPEG")}
    seen = set()
    for entry in manifest["shards"]:
        path = out / "train" / entry["name"]
        assert entry["num_bytes"] == path.stat().st_size and entry["sha256"] == sha(path)
        samples = tar_samples(path)
        assert len({v["cls"] for v in samples.values()}) >= 5  # globally shuffled: many classes per shard
        for key, parts in samples.items():
            assert parts["jpg"] == sources[key].read_bytes()  # original bytes, not re-encoded
            assert int(parts["cls"]) == int(key.split("/")[0][1:])
        seen |= samples.keys()
    assert seen == set(sources)
    assert report.splits["val"].manifest["num_samples"] == 40
    assert verify_shards(str(out)).ok
    # Reproducible: the same inputs and seed give byte-identical shards; another seed another order.
    again = shard_dataset(digits, tmp_path / "again", samples_per_shard=25, seed=7, progress=False)
    assert [s["sha256"] for s in again.splits["train"].manifest["shards"]] == [
        s["sha256"] for s in manifest["shards"]
    ]
    other = shard_dataset(digits, tmp_path / "other", samples_per_shard=25, seed=8, progress=False)
    assert other.splits["train"].manifest["shards"][0]["sha256"] != manifest["shards"][0]["sha256"]


def test_shard_by_megabytes_and_resize(tmp_path):
    photos = make_photo_imagefolder(
        tmp_path / "photos", num_classes=2, train_per_class=6, val_per_class=1, size=(200, 150)
    )
    images = [p.stat().st_size for p in photos.glob("train/*/*.JPEG")]
    report = shard_dataset(photos, tmp_path / "mb", shard_mb=0.03, progress=False, splits=("train",))
    sizes = [s["num_bytes"] for s in report.splits["train"].manifest["shards"]]
    assert len(sizes) >= sum(images) / 0.03e6
    assert max(sizes) < 0.03e6 + 12 * 1024 + 10240  # the target, plus tar headers and end blocks
    small = shard_dataset(
        photos,
        tmp_path / "small",
        samples_per_shard=100,
        resize_short_side=60,
        progress=False,
        splits=("train",),
    )
    assert len(small.splits["train"].manifest["reencoded"]) == 12
    for parts in tar_samples(tmp_path / "small" / "train" / "train-000000.tar").values():
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            assert im.format == "JPEG" and min(im.size) == 60 and im.size[0] == 80
    # Images already at or below the target keep their original bytes.
    same = shard_dataset(
        photos,
        tmp_path / "same",
        samples_per_shard=100,
        resize_short_side=150,
        progress=False,
        splits=("train",),
    )
    assert same.splits["train"].manifest["reencoded"] == []


def test_bad_inputs_are_skipped_and_reported_and_strict_stops(tmp_path, digits):
    src = tmp_path / "src"
    (src / "train").mkdir(parents=True)
    for k in range(3):
        (src / "train" / wnid(k)).symlink_to(digits / "train" / wnid(k))
    edge = write_edge_cases(src / "train" / "n00000009", image_size=48)
    out = run_cli(
        "shard", "--src", str(src), "--out", str(tmp_path / "o"), "--samples-per-shard", "50", "--no-progress"
    )
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "o" / "train" / "manifest.json").read_text())
    skipped = {Path(p).name: reason for p, reason in manifest["skipped"]}
    assert set(skipped) == {edge["truncated"].name, edge["garbage"].name}
    assert "truncated" in skipped[edge["truncated"].name]
    assert "unrecognized format" in skipped[edge["garbage"].name]
    assert str(edge["truncated"]) in out.stdout + out.stderr  # reported by path
    assert "2 unreadable skipped, 1 re-encoded" in out.stdout
    assert manifest["num_samples"] == 36 + 3
    samples = {}
    for entry in manifest["shards"]:
        samples.update(tar_samples(tmp_path / "o" / "train" / entry["name"]))
    for case, mode in (("cmyk", "CMYK"), ("grayscale", "L")):
        stored = samples[f"n00000009/edge_{case}"]["jpg"]
        assert stored == edge[case].read_bytes()  # kept as is; the loaders convert to RGB
        assert Image.open(io.BytesIO(stored)).mode == mode
    png = samples["n00000009/edge_png_as_jpeg"]["jpg"]
    assert Image.open(io.BytesIO(png)).format == "JPEG"
    with pytest.raises(BadImageError, match=r"edge_(truncated|garbage)\.JPEG.*--strict"):
        shard_dataset(src, tmp_path / "strict", samples_per_shard=50, strict=True, progress=False)
    strict = run_cli("shard", "--src", str(src), "--out", str(tmp_path / "s2"), "--strict", "--no-progress")
    assert strict.returncode == 1 and "--strict" in strict.stderr


def test_existing_different_shards_are_not_silently_replaced(tmp_path, digits):
    out = tmp_path / "o"
    shard_dataset(digits, out, samples_per_shard=20, seed=0, progress=False)
    up_to_date = shard_dataset(digits, out, samples_per_shard=20, seed=0, progress=False)
    assert up_to_date.written == 0
    with pytest.raises(ShardingError, match="--overwrite"):
        shard_dataset(digits, out, samples_per_shard=50, seed=1, progress=False)
    report = shard_dataset(digits, out, samples_per_shard=50, seed=1, overwrite=True, progress=False)
    assert report.splits["train"].manifest["num_shards"] == 3
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [f"train-{i:06d}.tar" for i in range(3)]
    assert verify_shards(str(out)).ok


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the job finished before it could be interrupted: make it bigger"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_local(tmp_path):
    src = make_digits_imagefolder(tmp_path / "src", image_size=32, train_per_class=60, val_per_class=1)
    reference = shard_dataset(src, tmp_path / "ref", samples_per_shard=2, splits=("train",), progress=False)
    out = tmp_path / "out"
    args = [
        "--src",
        str(src),
        "--out",
        str(out),
        "--samples-per-shard",
        "2",
        "--splits",
        "train",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "shard", *args, "--no-progress"], cwd=REPO)
    work = out / "train" / "_work"
    _kill_when(proc, lambda: work.is_dir() and len(list(work.glob("*.json"))) >= 5)
    ref_sha = {s["name"]: s["sha256"] for s in reference.splits["train"].manifest["shards"]}
    visible = sorted((out / "train").glob("train-*.tar"))
    assert len(visible) >= 5 and not (out / "train" / "manifest.json").exists()
    for path in visible:  # a visible shard is always a whole one
        assert sha(path) == ref_sha[path.name]
    before = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in visible
        if (work / (p.name + ".json")).exists()
    }
    # What a kill at another instant leaves: half-written files under hidden temporary names.
    (out / "train" / ".train-000299.tar.partial-1").write_bytes(b"half a shard")
    (work / ".train-000299.tar.json.partial-1").write_text("{")
    report = shard_dataset(src, out, samples_per_shard=2, splits=("train",), progress=False)
    result = report.splits["train"]
    assert result.reused == len(before) >= 5 and result.written == 300 - len(before)
    for name, stamp in before.items():  # finished shards were not redone
        p = out / "train" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp
    assert [s["sha256"] for s in result.manifest["shards"]] == list(ref_sha.values())
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "manifest.json",
        *sorted(ref_sha),
    ]  # no partials
    assert verify_shards(str(out), splits=("train",)).ok


# ============================================================================================ verify
def test_verify_reports_each_damaged_shard(tmp_path, digits):
    out = tmp_path / "o"
    shard_dataset(digits, out, samples_per_shard=20, progress=False)
    train = out / "train"
    with tarfile.open(train / "train-000001.tar") as tar:
        first_jpeg = next(m for m in tar if m.name.endswith(".jpg")).offset_data
    flipped = bytearray((train / "train-000001.tar").read_bytes())
    flipped[first_jpeg + 200 : first_jpeg + 210] = bytes(10)  # inside a JPEG: same size, other hash
    (train / "train-000001.tar").write_bytes(bytes(flipped))
    whole = (train / "train-000002.tar").read_bytes()
    cut = len(whole) // 2
    (train / "train-000002.tar").write_bytes(whole[:cut])
    (train / "train-000004.tar").unlink()
    out_cli = run_cli("verify", str(out), "--workers", "2")
    assert out_cli.returncode == 1
    text = out_cli.stdout
    assert "FAIL train/train-000001.tar: sha256" in text
    assert f"FAIL train/train-000002.tar: {cut} bytes" in text
    # Cut inside a member, tarfile raises; cut at a header, it ends quietly: a sample count short.
    assert re.search(r"FAIL train/train-000002.tar: (damaged tar|\d+ samples, manifest says 20)", text)
    assert "FAIL train/train-000004.tar: missing" in text
    assert "train-000000.tar" not in text and "train-000003.tar" not in text
    assert re.search(r"^[45] problem\(s\)$", text, re.MULTILINE)
    assert "val: 2 shards, 40 samples" in text


# ============================================================================================ S3
def test_shard_to_s3_verify_and_no_secrets_in_output(s3_server, digits):  # noqa: F811
    out = run_cli(
        "shard",
        "--src",
        str(digits),
        "--out",
        "s3://shards/cli",
        "--samples-per-shard",
        "30",
        "--workers",
        "2",
    )
    assert out.returncode == 0, out.stderr
    assert (
        "train: 120 images in 4 shards" in out.stdout
        and "-> s3://shards/cli/train/manifest.json" in out.stdout
    )
    keys = sorted(
        o["Key"] for o in s3_server.client().list_objects_v2(Bucket="shards", Prefix="cli/")["Contents"]
    )
    assert keys == ["cli/classes.json", "cli/train/manifest.json"] + [
        f"cli/train/train-{i:06d}.tar" for i in range(4)
    ] + [
        "cli/val/manifest.json",
        "cli/val/val-000000.tar",
        "cli/val/val-000001.tar",
    ]
    check = run_cli("verify", "s3://shards/cli")
    assert check.returncode == 0 and check.stdout.strip().endswith("OK"), check.stdout + check.stderr
    # The same shards over plain HTTP (the server allows anonymous reads), as verify sees them.
    assert verify_shards(f"{s3_server.endpoint_url}/shards/cli").ok
    for text in (out.stdout, out.stderr, check.stdout, check.stderr):
        assert SECRET_KEY not in text
    # Wrong secret, missing bucket: clear errors naming the location, never the secret.
    bad = run_cli("verify", "s3://shards/cli", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert (
        bad.returncode == 1
        and "s3://shards/cli/train/manifest.json: access denied (SignatureDoesNotMatch)" in bad.stderr
    )
    assert "not-the-secret" not in bad.stderr and SECRET_KEY not in bad.stderr
    nobucket = run_cli("shard", "--src", str(digits), "--out", "s3://no-such-bucket/x", "--no-progress")
    assert nobucket.returncode == 1 and "s3://no-such-bucket" in nobucket.stderr


def test_resume_after_sigkill_s3(s3_server, tmp_path):  # noqa: F811
    src = make_digits_imagefolder(tmp_path / "src", image_size=32, train_per_class=40, val_per_class=1)
    client = s3_server.client()
    args = [
        "--src",
        str(src),
        "--out",
        "s3://shards/resume",
        "--samples-per-shard",
        "2",
        "--splits",
        "train",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "shard", *args, "--no-progress"], cwd=REPO)

    def records() -> int:
        return client.list_objects_v2(Bucket="shards", Prefix="resume/train/_work/").get("KeyCount", 0)

    _kill_when(proc, lambda: records() >= 4)
    done = records()
    report = shard_dataset(src, "s3://shards/resume", samples_per_shard=2, splits=("train",), progress=False)
    assert report.splits["train"].reused >= done >= 4
    assert report.splits["train"].reused + report.splits["train"].written == 200
    assert client.list_objects_v2(Bucket="shards", Prefix="resume/train/_work/").get("KeyCount", 0) == 0
    assert "Uploads" not in client.list_multipart_uploads(Bucket="shards", Prefix="resume/")
    assert verify_shards("s3://shards/resume", splits=("train",)).ok
    reference = shard_dataset(src, tmp_path / "ref", samples_per_shard=2, splits=("train",), progress=False)
    assert [s["sha256"] for s in report.splits["train"].manifest["shards"]] == [
        s["sha256"] for s in reference.splits["train"].manifest["shards"]
    ]


def _kill_group_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    """SIGKILL the job's whole process group (the CLI and its writer processes) once ``ready()``."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the job finished before it could be interrupted: make it bigger"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with contextlib.suppress(ProcessLookupError):  # until the writers are gone too (5 s at most)
        for _ in range(500):
            os.killpg(proc.pid, 0)
            time.sleep(0.01)


def test_sigkill_mid_upload_leaves_no_staged_files(s3_server, tmp_path):  # noqa: F811
    """Shards on their way to S3 are staged in the temp folder: a killed job's leftovers are removed
    by the next run, while a concurrently running job's live staging is kept."""
    src = make_photo_imagefolder(tmp_path / "src", num_classes=3, train_per_class=40, val_per_class=1)
    system_tmp = tmp_path / "system-tmp"  # the job's TMPDIR: what tempfile.gettempdir() returns there
    system_tmp.mkdir()
    env = {"TMPDIR": str(system_tmp)}
    args = ["shard", "--src", str(src), "--out", "s3://shards/staged", "--samples-per-shard", "8"]
    args += ["--splits", "train", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_prep", *args],
        cwd=REPO,
        env={**os.environ, **env},
        start_new_session=True,
    )

    def staged() -> list[Path]:
        return [p for p in system_tmp.rglob("*.tar") if p.is_file()]

    _kill_group_when(proc, lambda: staged() and staged()[0].stat().st_size > 100_000)
    assert staged(), "the kill came after the staged shard was gone: nothing to test"
    with Staging("s3://shards/another-job", system_tmp) as other:  # a live job: this process holds its lock
        (other.path / "train-000000.tar").write_bytes(b"half a shard")
        rerun = run_cli(*args, env=env)
        assert rerun.returncode == 0, rerun.stderr
        assert (other.path / "train-000000.tar").read_bytes() == b"half a shard"
        assert [p.name for p in staged()] == ["train-000000.tar"]  # the killed job's shards are gone
    assert [p for p in system_tmp.rglob("*") if not p.is_dir()] == []
    assert [p.name for p in system_tmp.iterdir()] in ([], ["localsgd-staging"])
    assert list((system_tmp / "localsgd-staging").iterdir()) == []
    assert "Uploads" not in s3_server.client().list_multipart_uploads(Bucket="shards", Prefix="staged/")
    report = verify_shards("s3://shards/staged", splits=("train",))
    assert report.ok and report.splits["train"].samples == 120, report.summary()
