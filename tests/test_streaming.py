"""localsgd_ds.data and localsgd_ds.s3: partition arithmetic, decoding against torchvision, exact and
deterministic epochs, corrupt samples, and streaming from a real SeaweedFS server (S3 and plain HTTP),
including a 2-process gloo run, a stalled server, a missing shard and a wrong secret."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from s3_server import SECRET_KEY, s3_server  # noqa: F401 - the module-scoped server fixture

from data_prep.shard import shard_dataset
from data_prep.synthetic import _sample_photos, make_digits_imagefolder
from localsgd_ds import s3
from localsgd_ds.data import (
    decode_train,
    decode_val,
    epoch_order,
    evaluate_counts,
    random_resized_crop,
    read_manifest,
    register_s3_gopen,
    steps_per_epoch,
    stream_pieces,
    train_loader,
    val_loader,
    worker_batches,
)
from localsgd_ds.runtime import free_port

SIZE = 32  # output pixels in loader tests: small, fast
TRAIN_N, VAL_N = 200, 60


# ============================================================================================ fixtures
@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    """10 classes x 20 train / 6 val digits, in uneven shards of 23 (9 train shards, 3 val shards)."""
    root = tmp_path_factory.mktemp("stream")
    src = make_digits_imagefolder(root / "src", image_size=40, train_per_class=20, val_per_class=6)
    shard_dataset(src, root / "shards", samples_per_shard=23, progress=False)
    return str(root / "shards")


@pytest.fixture(scope="module")
def s3_shards(s3_server, local_shards) -> str:  # noqa: F811
    """The same shard files uploaded to s3://shards/stream (byte-identical: data_prep is reproducible)."""
    client = s3_server.client()
    for path in sorted(Path(local_shards).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "shards", f"stream/{path.relative_to(local_shards)}")
    return "s3://shards/stream"


def all_batches(loader) -> list:
    return [tuple(x) for x in loader]


def png_jpeg(mode: str, size=(120, 90)) -> bytes:
    photo = Image.fromarray(_sample_photos()[0]).resize(size).convert(mode)
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ============================================================================================ pure logic
def test_stream_pieces_cover_ranges_exactly():
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.randint(0, 9) for _ in range(rng.randint(1, 8))]
        total = sum(counts)
        if total == 0:
            continue
        order = list(range(len(counts)))
        rng.shuffle(order)
        offset = rng.randrange(total)
        concat = [(s, i) for s in order for i in range(counts[s])]
        rotated = concat[offset:] + concat[:offset]
        a = rng.randint(0, total)
        b = rng.randint(a, total)
        got = [
            (p.shard, p.first + i) for p in stream_pieces(counts, order, offset, a, b) for i in range(p.count)
        ]
        assert got == rotated[a:b]


def test_worker_batches_and_epoch_order():
    for steps in range(0, 30):
        for w in range(1, 6):
            share = worker_batches(steps, w)
            assert (
                sum(share) == steps and max(share) - min(share) <= 1 and share == sorted(share, reverse=True)
            )
    counts = [5, 7, 3, 9]
    assert epoch_order(counts, 0, 3) == epoch_order(counts, 0, 3)
    assert len({str(epoch_order(counts, 0, e)) for e in range(6)}) > 3
    assert epoch_order(counts, 1, 3) != epoch_order(counts, 0, 3)


def test_random_resized_crop_bounds_and_scale():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        left, top, w, h = random_resized_crop(500, 375, rng)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375 and w > 0 and h > 0
        areas.append(w * h / (500 * 375))
    assert 0.07 < min(areas) < 0.12 and max(areas) > 0.95
    # The same distribution as torchvision's own sampler (which draws from torch's global RNG).
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    image = torch.zeros(3, 375, 500)
    theirs = [
        h * w / (500 * 375)
        for _, _, h, w in (
            RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)
        )
    ]
    assert abs(np.mean(areas) - np.mean(theirs)) < 0.03 and abs(np.median(areas) - np.median(theirs)) < 0.04


# ============================================================================================ decoding
def test_decode_matches_torchvision_reference():
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    jpeg = png_jpeg("RGB", size=(500, 375))
    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
    reference = np.asarray(T.Compose([T.Resize(256), T.CenterCrop(224)])(image), dtype=float)
    assert np.abs(decode_val(jpeg, 256, 224) - reference).mean() < 0.05
    for seed in range(4):
        ours = decode_train(jpeg, np.random.default_rng(seed), 224).astype(float)
        rng = np.random.default_rng(seed)
        left, top, w, h = random_resized_crop(500, 375, rng)
        ref = F.resized_crop(image, top, left, h, w, [224, 224])
        ref = np.asarray(F.hflip(ref) if rng.random() < 0.5 else ref, dtype=float)
        limit = (
            0.5 if min(w, h) < 448 else 3.0
        )  # >= 2x the output: libjpeg's DCT downscale, slightly different
        assert np.abs(ours - ref).mean() < limit


def test_normalize_is_imagenet_mean_std():
    from localsgd_ds.data import IMAGENET_MEAN, IMAGENET_STD, normalize

    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    expected = (batch.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    out = normalize(batch)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.allclose(out, expected, atol=1e-5)


def test_decode_cmyk_and_grayscale_to_rgb():
    for mode in ("CMYK", "L"):
        jpeg = png_jpeg(mode)
        assert Image.open(io.BytesIO(jpeg)).mode == mode
        out = decode_train(jpeg, np.random.default_rng(0), 48)
        assert out.shape == (48, 48, 3) and out.dtype == np.uint8
        val = decode_val(jpeg, 64, 48)
        assert val.shape == (48, 48, 3)
        if mode == "L":
            assert (val[..., 0] == val[..., 1]).all() and (val[..., 1] == val[..., 2]).all()


# ============================================================================================ local epochs
def test_train_epoch_is_an_exact_deterministic_partition(local_shards):
    world, bs = 3, 8
    steps = steps_per_epoch(local_shards, batch_size=bs, world_size=world)
    assert steps == TRAIN_N // (world * bs) == 8
    per_epoch = []
    for epoch in (0, 1):
        keys = []
        for rank in range(world):
            loader = train_loader(
                local_shards, batch_size=bs, rank=rank, world_size=world, epoch=epoch, image_size=SIZE,
                num_workers=2, with_keys=True, shuffle_block=16,
            )  # fmt: skip
            batches = all_batches(loader)
            assert len(loader) == len(batches) == steps
            for images, labels, k in batches:
                assert images.shape == (bs, 3, SIZE, SIZE) and images.dtype == torch.float32
                assert labels.dtype == torch.int64 and images.is_contiguous()
                assert [int(x.split("/")[0][1:]) for x in k] == labels.tolist()
                keys += k
            assert loader.skipped_samples == 0
        assert len(keys) == len(set(keys)) == world * steps * bs  # no sample twice in an epoch
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1] and set(per_epoch[0]) != set(per_epoch[1])
    # Normalized with ImageNet statistics: roughly zero-mean, unit-scale values.
    images = torch.cat(
        [
            b[0]
            for b in all_batches(
                train_loader(
                    local_shards, batch_size=bs, rank=0, world_size=1, epoch=0, image_size=SIZE, num_workers=0
                )
            )
        ]
    )
    assert -1.5 < images.mean() < 1.5 and 0.3 < images.std() < 2.0


def test_one_shard_feeds_64_ranks_equally(local_shards, tmp_path):
    src = Path(local_shards).parent / "src"
    one = tmp_path / "one"
    shard_dataset(src, one, samples_per_shard=10_000, splits=("train",), progress=False)
    assert len(read_manifest(str(one), "train").shards) == 1
    keys = []
    for rank in range(64):
        loader = train_loader(
            str(one),
            batch_size=3,
            rank=rank,
            world_size=64,
            epoch=0,
            image_size=16,
            num_workers=0,
            with_keys=True,
        )
        batches = all_batches(loader)
        assert len(batches) == len(loader) == 1  # 200 // (64 x 3)
        keys += batches[0][2]
    assert len(keys) == len(set(keys)) == 192


def test_train_loader_is_reproducible_and_resumes_exactly(local_shards):
    kw = dict(
        batch_size=8,
        rank=1,
        world_size=2,
        epoch=5,
        seed=3,
        image_size=SIZE,
        num_workers=2,
        with_keys=True,
        shuffle_block=20,
    )
    first = all_batches(train_loader(local_shards, **kw))
    again = all_batches(train_loader(local_shards, **kw))
    assert len(first) == 12
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    for skip in (1, 5, 11, 12):
        resumed = train_loader(local_shards, skip_batches=skip, **kw)
        rest = all_batches(resumed)
        assert len(resumed) == len(rest) == 12 - skip
        for a, b in zip(first[skip:], rest, strict=True):
            assert torch.equal(a[0], b[0]) and a[2] == b[2]
    other_seed = all_batches(train_loader(local_shards, **{**kw, "seed": 4}))
    assert [b[2] for b in other_seed] != [b[2] for b in first]
    with pytest.raises(ValueError, match="skip_batches=13"):
        train_loader(local_shards, skip_batches=13, **kw)
    with pytest.raises(ValueError, match="fewer than world_size x batch_size"):
        train_loader(local_shards, batch_size=128, rank=0, world_size=2, epoch=0)


def test_val_covers_every_sample_once(local_shards):
    world = 3
    keys, totals = [], []
    for rank in range(world):
        loader = val_loader(
            local_shards,
            batch_size=7,
            rank=rank,
            world_size=world,
            resize=40,
            crop=SIZE,
            num_workers=2,
            with_keys=True,
        )
        batches = all_batches(loader)
        assert len(batches) == len(loader)
        totals.append(sum(len(b[1]) for b in batches))
        for images, _labels, k in batches:
            assert images.shape[1:] == (3, SIZE, SIZE)
            keys += k
    assert sum(totals) == VAL_N and len(keys) == len(set(keys)) == VAL_N
    assert evaluate_counts(5, sum(totals)) == (5, VAL_N)  # no process group: the counts themselves
    with pytest.raises(ValueError, match="val_crop = 64 is larger than DataConfig.val_resize = 40"):
        val_loader(local_shards, batch_size=8, rank=0, world_size=1, resize=40, crop=64)


# ============================================================================================ corrupt data
def _copy_with_damage(src: str, dst: Path) -> tuple[str, str]:
    """Copy a shard set; garble one JPEG of train-000002 (same length) and the header of a member in
    train-000005. Returns the garbled sample's key and the shard with the damaged header."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "train" / "train-000002.tar"
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = [m for m in tar if m.name.endswith(".jpg")][4]
    data[member.offset_data : member.offset_data + member.size] = bytes(range(256)) * (
        member.size // 256
    ) + bytes(member.size % 256)
    path.write_bytes(bytes(data))  # the manifest's sha256 no longer matches: bit rot after sharding
    path5 = dst / "train" / "train-000005.tar"
    data5 = bytearray(path5.read_bytes())
    with tarfile.open(path5) as tar:
        header = [m for m in tar][30].offset
    data5[header : header + 512] = b"\xff" * 512
    path5.write_bytes(bytes(data5))
    return member.name[: -len(".jpg")], "train-000005.tar"


def test_corrupt_samples_are_skipped_counted_and_logged(local_shards, tmp_path, caplog):
    damaged = tmp_path / "damaged"
    bad_key, bad_shard = _copy_with_damage(local_shards, damaged)
    caplog.set_level(logging.WARNING, logger="localsgd_ds.data")
    kw = dict(batch_size=8, rank=0, world_size=1, epoch=0, image_size=SIZE, with_keys=True, shuffle_block=16)
    loader = train_loader(str(damaged), num_workers=0, **kw)
    batches = all_batches(loader)
    assert len(batches) == len(loader) == TRAIN_N // 8  # the batch count never changes
    assert loader.skipped_samples > 1
    assert any(bad_key in k and "train-000002.tar" in k for k in loader.skipped_keys)
    assert any(bad_shard in k for k in loader.skipped_keys)
    logged = caplog.text
    assert "skipped corrupt sample" in logged and bad_key in logged and "damaged tar data" in logged
    keys = [k for b in batches for k in b[2]]
    assert len(keys) == TRAIN_N and bad_key not in keys
    assert len(set(keys)) == TRAIN_N - loader.skipped_samples  # each slot refilled by a duplicate
    # Same batches from worker processes, and when resuming past the damage.
    with_workers = all_batches(train_loader(str(damaged), num_workers=1, **kw))
    assert [b[2] for b in with_workers] == [b[2] for b in batches]
    resumed = all_batches(train_loader(str(damaged), num_workers=1, skip_batches=7, **kw))
    assert [b[2] for b in resumed] == [b[2] for b in batches[7:]]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(resumed, batches[7:], strict=True))
    val = val_loader(str(damaged), batch_size=8, rank=0, world_size=1, resize=40, crop=SIZE)
    assert sum(len(b[1]) for b in val) == VAL_N and val.skipped_samples == 0


# ============================================================================================ S3 + HTTP
def test_s3_streaming_equals_local_disk(s3_shards, local_shards):
    kw = dict(
        batch_size=8,
        rank=1,
        world_size=2,
        epoch=2,
        image_size=SIZE,
        num_workers=2,
        with_keys=True,
        skip_batches=3,
    )
    remote, local = all_batches(train_loader(s3_shards, **kw)), all_batches(train_loader(local_shards, **kw))
    assert len(remote) == len(local) == 9
    for a, b in zip(remote, local, strict=True):
        assert torch.equal(a[0], b[0]) and a[2] == b[2]
    manifest = read_manifest(s3_shards, "train")
    assert (
        manifest.num_samples == TRAIN_N and len(manifest.shards) == 9 and manifest.classes[0] == "n00000000"
    )


def test_http_location_reads_the_same_validation(s3_server, s3_shards, local_shards):  # noqa: F811
    url = f"{s3_server.endpoint_url}/shards/stream"  # anonymous GETs with Range, no boto3
    kw = dict(batch_size=16, rank=0, world_size=2, resize=40, crop=SIZE, num_workers=0, with_keys=True)
    for a, b in zip(
        all_batches(val_loader(url, **kw)), all_batches(val_loader(local_shards, **kw)), strict=True
    ):
        assert torch.equal(a[0], b[0]) and a[2] == b[2]


def test_webdataset_reads_s3_urls_in_worker_processes(s3_shards):
    import webdataset as wds

    urls = f"{s3_shards}/train/train-{{000000..000008}}.tar"
    for context, init in (("fork", None), ("spawn", register_s3_gopen)):
        dataset = wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker
        )
        dataset = dataset.to_tuple("__key__", "cls")
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=2, multiprocessing_context=context, worker_init_fn=init
        )
        keys = [key for key, _ in loader]
        assert len(keys) == len(set(keys)) == TRAIN_N, context


def test_missing_shard_and_bad_secret_are_clear_errors(s3_server, local_shards, monkeypatch):  # noqa: F811
    client = s3_server.client()
    for path in sorted(Path(local_shards).rglob("*")):
        if path.is_file():
            client.upload_file(str(path), "shards", f"holes/{path.relative_to(local_shards)}")
    client.delete_object(Bucket="shards", Key="holes/train/train-000003.tar")
    loader = train_loader(
        "s3://shards/holes", batch_size=8, rank=0, world_size=1, epoch=0, image_size=SIZE, num_workers=2
    )
    with pytest.raises(
        s3.ObjectNotFoundError,
        match=r"s3://shards/holes/train/train-000003\.tar: no such object \(NoSuchKey\)",
    ):
        all_batches(loader)
    with pytest.raises(s3.ObjectNotFoundError, match="no manifest for split 'train'"):
        read_manifest("s3://shards/nothing-here", "train")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong")
    s3.reset_clients()
    try:
        with pytest.raises(s3.AccessDeniedError) as err:
            train_loader("s3://shards/holes", batch_size=8, rank=0, world_size=1, epoch=0)
        message = str(err.value)
        assert "s3://shards/holes/train/manifest.json: access denied (SignatureDoesNotMatch)" in message
        assert "definitely-wrong" not in message and SECRET_KEY not in message
    finally:
        monkeypatch.undo()
        s3.reset_clients()


def test_stalled_server_is_retried_mid_stream(s3_server, monkeypatch, caplog):  # noqa: F811
    # 48 MB: more than loopback socket buffers hold, so the reader really waits on the frozen server.
    payload = np.random.default_rng(0).bytes(48 << 20)
    s3_server.client().put_object(Bucket="shards", Key="big.bin", Body=payload)
    monkeypatch.setenv("LOCALSGD_IO_TIMEOUT", "1")
    s3.reset_clients()
    caplog.set_level(logging.WARNING, logger="localsgd_ds.s3")
    try:
        with s3.open_stream("s3://shards/big.bin") as stream:
            head = stream.read(1 << 20)
            s3_server.pause()
            timer = threading.Timer(3.0, s3_server.resume)
            timer.start()
            start = time.monotonic()
            rest = stream.read()
            stalled = time.monotonic() - start
        timer.join()
    finally:
        s3_server.resume()
        monkeypatch.undo()
        s3.reset_clients()
    assert head + rest == payload
    assert stalled > 2.0 and "reopening" in caplog.text


def test_reader_reopens_at_the_failed_byte(monkeypatch, tmp_path):
    """Pure logic (a fake transport): every transient failure resumes at the exact byte."""
    data = bytes(range(256)) * 400
    opened = []

    class Flaky:
        def __init__(self, start, end):
            self.pos, self.end, self.reads = start, end, 0

        def read(self, n):
            self.reads += 1
            if self.reads == 3:
                raise ConnectionResetError("peer reset")
            chunk = data[self.pos : min(self.pos + min(n, 5000), self.end or len(data))]
            self.pos += len(chunk)
            return chunk

        def close(self):
            pass

    def fake_open(loc, start, end):
        opened.append((start, end))
        return Flaky(start, end)

    monkeypatch.setattr(s3, "_open_raw", fake_open)
    monkeypatch.setattr(s3, "_sleep", lambda seconds: None)
    monkeypatch.setenv("LOCALSGD_IO_RETRIES", "50")
    with s3.open_stream("s3://bucket/key", start=100, end=90000) as f:
        assert f.read() == data[100:90000]
    assert len(opened) > 3 and opened[0] == (100, 90000)
    assert all(a < b for (a, _), (b, _) in zip(opened, opened[1:]))  # each reopen starts further on

    class Dead(Flaky):
        def read(self, n):
            raise ConnectionResetError("peer reset")

    opened.clear()
    monkeypatch.setattr(s3, "_open_raw", lambda loc, start, end: opened.append(start) or Dead(start, end))
    monkeypatch.setenv("LOCALSGD_IO_RETRIES", "2")
    with pytest.raises(s3.StorageError, match="s3://bucket/key: read failed at byte 0"):
        with s3.open_stream("s3://bucket/key") as f:
            f.read()
    assert len(opened) == 3  # the first try and 2 retries, then a clear error


# ============================================================================================ 2 processes
def _rank_main(rank: int, world: int, port: int, location: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        steps = steps_per_epoch(location, batch_size=8, world_size=world)
        train = train_loader(
            location,
            batch_size=8,
            rank=rank,
            world_size=world,
            epoch=1,
            image_size=SIZE,
            num_workers=2,
            with_keys=True,
        )
        train_keys, batches = [], 0
        for images, _labels, keys in train:
            assert images.shape == (8, 3, SIZE, SIZE)
            train_keys += keys
            batches += 1
        val_keys, correct, total = [], 0, 0
        for _images, labels, keys in val_loader(
            location,
            batch_size=7,
            rank=rank,
            world_size=world,
            resize=40,
            crop=SIZE,
            num_workers=2,
            with_keys=True,
        ):
            val_keys += keys
            correct += int((labels == 3).sum())  # a fixed "prediction" with a known answer: class 3
            total += len(labels)
        summed = evaluate_counts(correct, total)
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {
                    "steps": steps,
                    "batches": batches,
                    "train": train_keys,
                    "val": val_keys,
                    "local": [correct, total],
                    "summed": list(summed),
                }
            )
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_stream_from_s3(s3_shards, tmp_path):
    mp.start_processes(
        _rank_main, args=(2, free_port(), s3_shards, str(tmp_path)), nprocs=2, start_method="spawn"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = TRAIN_N // (2 * 8)
    assert [r["batches"] for r in ranks] == [steps, steps] and ranks[0]["steps"] == steps
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    val = ranks[0]["val"] + ranks[1]["val"]
    assert len(val) == len(set(val)) == VAL_N  # every validation sample exactly once
    assert ranks[0]["summed"] == ranks[1]["summed"] == [6, VAL_N]  # 6 val images per class
    assert (
        sum(r["local"][1] for r in ranks) == VAL_N and Counter(k.split("/")[0] for k in val)["n00000003"] == 6
    )
