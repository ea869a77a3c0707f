"""Command line of data_prep: ``synthetic``, ``shard`` and ``verify`` (see ``python -m data_prep --help``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

EXAMPLES = """\
examples:
  # a small real dataset (sklearn digits as colour JPEGs) in the ImageNet class-folder layout
  python -m data_prep synthetic --out data/digits --image-size 64 --train-per-class 100 --val-per-class 20

  # ImageNet to local shards of about 256 MB, 8 processes
  python -m data_prep shard --src /data/imagenet --out shards/imagenet --workers 8

  # to S3-compatible storage: endpoint and keys from the standard AWS variables or ~/.aws
  export AWS_ENDPOINT_URL=http://127.0.0.1:8333 AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...
  python -m data_prep shard --src data/digits --out s3://datasets/digits --samples-per-shard 128 --workers 2

  # a budget copy with images re-encoded to a short side of 160 px
  python -m data_prep shard --src /data/imagenet --out s3://datasets/imagenet-160 --resize-short-side 160

  # rerun the same command after an interruption: finished shards are kept, the rest is written
  # check a shard set against its manifests (counts, sizes, sha256, sample format)
  python -m data_prep verify s3://datasets/digits
"""

LAYOUTS = """\
accepted --src layouts:
  ROOT/train/<class>/*.JPEG and/or ROOT/val/<class>/*.JPEG   (class folders; any class names)
  ROOT/val/*.JPEG + LOC_val_solution.csv                      (Kaggle; the csv in ROOT, its parent or ROOT/val)
  ROOT/val/*.JPEG + ILSVRC2012_validation_ground_truth.txt + meta.mat   (ILSVRC2012 devkit; needs scipy)
  ROOT/ILSVRC/Data/CLS-LOC/{train,val} + ROOT/LOC_val_solution.csv     (the Kaggle download)
output: LOCATION/classes.json, LOCATION/<split>/manifest.json, LOCATION/<split>/<split>-NNNNNN.tar
"""


def _splits(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if not parts:
        raise argparse.ArgumentTypeError("give at least one split name, e.g. train,val")
    return parts


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Shard ImageNet-style image folders into webdataset tars on a path or S3, and check them.",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{synthetic,shard,verify}")

    syn = sub.add_parser(
        "synthetic",
        help="write a small real dataset (sklearn digits as JPEGs)",
        epilog=EXAMPLES,
        formatter_class=fmt,
    )
    syn.add_argument(
        "--out", required=True, help="folder to create: OUT/train/<wnid>/*.JPEG, OUT/val/<wnid>/*.JPEG"
    )
    syn.add_argument("--image-size", type=int, default=64, help="side in pixels (default 64)")
    syn.add_argument(
        "--train-per-class", type=int, default=100, help="training images per class (default 100)"
    )
    syn.add_argument(
        "--val-per-class",
        type=int,
        default=20,
        help="validation images per class, held-out digits (default 20)",
    )
    syn.add_argument("--seed", type=int, default=0)

    sh = sub.add_parser(
        "shard",
        help="write shards, manifests and classes.json",
        epilog=EXAMPLES + "\n" + LAYOUTS,
        formatter_class=fmt,
    )
    sh.add_argument("--src", required=True, help="the image folder (see the accepted layouts below)")
    sh.add_argument("--out", required=True, help="a folder, file:// URL, or s3://bucket/prefix")
    size = sh.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, help="target samples per shard")
    size.add_argument("--shard-mb", type=float, help="target shard size in MB of source bytes (default 256)")
    sh.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel writer processes (default: all cores)",
    )
    sh.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    sh.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable image instead of skipping it"
    )
    sh.add_argument(
        "--resize-short-side", type=int, metavar="N", help="re-encode images whose short side exceeds N px"
    )
    sh.add_argument("--jpeg-quality", type=int, default=90, help="quality when re-encoding (default 90)")
    sh.add_argument(
        "--splits",
        type=_splits,
        default=("train", "val"),
        help="comma-separated split folders (default train,val)",
    )
    sh.add_argument(
        "--overwrite", action="store_true", help="replace shards made from other inputs or settings"
    )
    sh.add_argument(
        "--tmp-dir",
        help="local scratch folder for shards on their way to S3: they are staged in TMP_DIR/localsgd-staging, "
        "where each run removes what killed runs left (default: the system temp folder)",
    )
    sh.add_argument("--no-progress", action="store_true", help="no progress bar")

    ver = sub.add_parser(
        "verify", help="check shards against their manifests", epilog=EXAMPLES, formatter_class=fmt
    )
    ver.add_argument("location", help="a folder, file:// URL, s3://bucket/prefix or http(s) URL")
    ver.add_argument(
        "--splits", type=_splits, default=("train", "val"), help="splits to check (default train,val)"
    )
    ver.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel reader processes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synthetic":
        from data_prep.synthetic import make_digits_imagefolder

        start = time.perf_counter()
        root = make_digits_imagefolder(
            args.out, args.image_size, args.train_per_class, args.val_per_class, args.seed
        )
        n = 10 * (args.train_per_class + args.val_per_class)
        print(
            f"wrote {n} JPEGs ({args.image_size} px, 10 classes) under {root} in {time.perf_counter() - start:.1f} s"
        )
        return 0

    from data_prep.layout import LayoutError
    from data_prep.shard import BadImageError, ShardingError
    from localsgd_ds.s3 import StorageError

    try:
        if args.command == "shard":
            return _shard(args)
        return _verify(args)
    except (LayoutError, ShardingError, BadImageError, StorageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _shard(args) -> int:
    from data_prep.shard import shard_dataset
    from localsgd_ds.s3 import redact

    start = time.perf_counter()
    # Every option of `shard` is the shard_dataset keyword of the same name, except --no-progress.
    options = {name: value for name, value in vars(args).items() if name not in ("command", "no_progress")}
    report = shard_dataset(progress=not args.no_progress, **options)
    for name, result in report.splits.items():
        m = result.manifest
        print(
            f"{name}: {m['num_samples']} images in {m['num_shards']} shards ({m['num_bytes'] / 1e6:.1f} MB); "
            f"{result.written} written, {result.reused} reused, {len(result.skipped)} unreadable skipped, "
            f"{len(m['reencoded'])} re-encoded -> {redact(result.manifest_url)}"
        )
    print(
        f"{len(report.classes)} classes -> {redact(report.location)}/classes.json; {time.perf_counter() - start:.1f} s"
    )
    return 0


def _verify(args) -> int:
    from data_prep.verify import verify_shards

    report = verify_shards(args.location, args.splits, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
