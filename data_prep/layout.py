"""Find the images and labels of an ImageNet-style folder, in the layouts people actually have.

Accepted (checked in this order), with ``ROOT`` the ``--src`` folder:

1. Kaggle download: ``ROOT/ILSVRC/Data/CLS-LOC/{train,val}`` and ``ROOT/LOC_val_solution.csv``.
2. Class folders: ``ROOT/<split>/<class>/*.JPEG`` for each split (``train``, ``val``, ...). Class names
   are any folder names (ImageNet's are WordNet ids); labels are their sorted order, the torchvision
   ``ImageFolder`` convention, and the training split defines the classes.
3. Flat validation folder ``ROOT/val/*.JPEG`` with its labels in ``LOC_val_solution.csv`` (Kaggle:
   ``ImageId,PredictionString`` whose first word is the wnid) or in the devkit's
   ``ILSVRC2012_validation_ground_truth.txt`` (one ILSVRC2012_ID per line, in file-name order) plus the
   devkit's ``meta.mat`` that maps those ids to wnids (read with scipy).

Example::

    from data_prep.layout import discover
    source = discover("/data/imagenet")            # source.classes, source.splits["train"].samples
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")

EXPECTED_LAYOUTS = """\
  ROOT/train/<class>/*.JPEG and/or ROOT/val/<class>/*.JPEG   (class folders; any class names)
  ROOT/val/*.JPEG + LOC_val_solution.csv                      (Kaggle; the csv in ROOT, its parent or ROOT/val)
  ROOT/val/*.JPEG + ILSVRC2012_validation_ground_truth.txt + meta.mat   (ILSVRC2012 devkit)
  ROOT/ILSVRC/Data/CLS-LOC/{train,val} + ROOT/LOC_val_solution.csv     (Kaggle download as unpacked)"""


class LayoutError(ValueError):
    """The source folder matches no supported layout; the message lists the expected ones."""


@dataclass(frozen=True)
class SourceSample:
    """One input image: ``relpath`` (relative to the split folder) names it in keys and reports."""

    path: str
    relpath: str
    label: int
    size: int


@dataclass(frozen=True)
class SourceSplit:
    name: str
    samples: tuple[SourceSample, ...]
    layout: str  # "class folders", "Kaggle LOC_val_solution.csv" or "devkit ground truth"


@dataclass(frozen=True)
class SourceDataset:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, SourceSplit]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_in(folder: Path) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(folder) if e.is_file() and _is_image(e.name)), key=lambda e: e.name)


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_folder_split(name: str, folder: Path, classes: dict[str, int]) -> SourceSplit:
    samples = []
    empty = []
    for cls in _class_dirs(folder):
        if cls not in classes:
            raise LayoutError(
                f"{folder / cls}: class {cls!r} is not among the {len(classes)} training classes"
            )
        entries = _images_in(folder / cls)
        if not entries:
            empty.append(cls)
        for e in entries:
            samples.append(SourceSample(e.path, f"{cls}/{e.name}", classes[cls], e.stat().st_size))
    if empty:
        shown = ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else "")
        raise LayoutError(f"{folder}: {len(empty)} class folder(s) hold no images: {shown}")
    return SourceSplit(name, tuple(samples), "class folders")


def _find(names: tuple[str, ...], folders: list[Path]) -> Path | None:
    for folder in folders:
        for name in names:
            for candidate in (
                folder / name,
                folder / "ILSVRC2012_devkit_t12" / "data" / name,
                folder / "data" / name,
            ):
                if candidate.is_file():
                    return candidate
    return None


def _kaggle_labels(csv_path: Path) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (first word of PredictionString)."""
    labels = {}
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise LayoutError(
                f"{csv_path}: expected columns ImageId,PredictionString; got {reader.fieldnames}"
            )
        for row in reader:
            words = row["PredictionString"].split()
            if not words:
                raise LayoutError(f"{csv_path}: ImageId {row['ImageId']} has an empty PredictionString")
            labels[row["ImageId"]] = words[0]
    return labels


def _devkit_labels(truth_path: Path, images: list[os.DirEntry]) -> dict[str, str]:
    """Image stem -> wnid from the devkit ground truth (ILSVRC2012_IDs) and meta.mat (ids -> wnids)."""
    meta = truth_path.parent / "meta.mat"
    if not meta.is_file():
        raise LayoutError(f"{truth_path}: the devkit's meta.mat (ILSVRC2012_ID -> wnid) is missing beside it")
    try:
        import scipy.io
    except ImportError:
        raise LayoutError(f"{meta}: reading the devkit's meta.mat needs scipy (pip install scipy)") from None
    synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in truth_path.read_text().split()]
    # Ground truth line i is for ILSVRC2012_val_<i>.JPEG; match on the number, not on listing order.
    labels = {}
    for e in images:
        m = re.search(r"(\d+)\.\w+$", e.name)
        if m is None or not 1 <= int(m.group(1)) <= len(ids):
            raise LayoutError(
                f"{e.path}: no ground-truth line for this file in {truth_path} ({len(ids)} lines)"
            )
        ilsvrc_id = ids[int(m.group(1)) - 1]
        if ilsvrc_id not in id_to_wnid:
            raise LayoutError(f"{truth_path}: ILSVRC2012_ID {ilsvrc_id} is not a leaf synset in {meta}")
        labels[Path(e.name).stem] = id_to_wnid[ilsvrc_id]
    return labels


def _flat_split(name: str, folder: Path, search: list[Path]) -> tuple[SourceSplit | None, list[str]]:
    """A flat folder of images labelled by a Kaggle csv or the devkit; returns (split, its wnids)."""
    images = _images_in(folder)
    if not images:
        return None, []
    csv_path = _find(("LOC_val_solution.csv",), search)
    if csv_path is not None:
        labels, layout = _kaggle_labels(csv_path), f"Kaggle {csv_path.name}"
    else:
        truth = _find(("ILSVRC2012_validation_ground_truth.txt",), search)
        if truth is None:
            raise LayoutError(
                f"{folder}: {len(images)} images but no labels: expected LOC_val_solution.csv (Kaggle) or "
                f"ILSVRC2012_validation_ground_truth.txt + meta.mat (devkit) in {', '.join(map(str, search))}"
            )
        labels, layout = _devkit_labels(truth, images), f"devkit {truth.name}"
    pending = []
    for e in images:
        stem = Path(e.name).stem
        if stem not in labels:
            raise LayoutError(f"{e.path}: no label for ImageId {stem!r} in the {layout} file")
        pending.append((e, labels[stem]))
    return SourceSplit(
        name, tuple(SourceSample(e.path, e.name, -1, e.stat().st_size) for e, _ in pending), layout
    ), [w for _, w in pending]


def discover(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> SourceDataset:
    """Read the folder structure (no image is opened) and assign labels; raises LayoutError if none fits."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise LayoutError(f"{root}: not a folder")
    data_root = root
    search = [root, root.parent]
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    if kaggle.is_dir():
        data_root = kaggle
        search = [root, kaggle, kaggle / "val"]
    present = [s for s in splits if (data_root / s).is_dir()]
    if not present:
        raise LayoutError(
            f"{root}: none of the splits {', '.join(splits)} is a folder here; expected one of:\n{EXPECTED_LAYOUTS}"
        )
    # Classes come from the training split's folders when it has them, else from the first class-folder split.
    class_source = next((s for s in present if s == "train" and _class_dirs(data_root / s)), None) or next(
        (s for s in present if _class_dirs(data_root / s)), None
    )
    classes: list[str] = _class_dirs(data_root / class_source) if class_source else []
    result: dict[str, SourceSplit] = {}
    flat_wnids: dict[str, list[str]] = {}
    for name in present:
        folder = data_root / name
        if _class_dirs(folder):
            result[name] = None  # filled once the classes are final
            continue
        split, wnids = _flat_split(name, folder, [*search, folder])
        if split is None:
            raise LayoutError(
                f"{folder}: neither class folders nor images; expected one of:\n{EXPECTED_LAYOUTS}"
            )
        result[name], flat_wnids[name] = split, wnids
    if not classes:  # only flat splits: the label files name the classes
        classes = sorted({w for ws in flat_wnids.values() for w in ws})
    index = {c: i for i, c in enumerate(classes)}
    for name, wnids in flat_wnids.items():
        unknown = sorted(set(wnids) - set(index))
        if unknown:
            raise LayoutError(
                f"{data_root / name}: labels {unknown[:5]} are not among the {len(classes)} classes"
            )
        samples = tuple(
            SourceSample(s.path, s.relpath, index[w], s.size)
            for s, w in zip(result[name].samples, wnids, strict=True)
        )
        result[name] = SourceSplit(name, samples, result[name].layout)
    for name in present:
        if result[name] is None:
            result[name] = _class_folder_split(name, data_root / name, index)
        if not result[name].samples:
            raise LayoutError(f"{data_root / name}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return SourceDataset(root, tuple(classes), result)
