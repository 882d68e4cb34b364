"""From a materialised folder to a task layout: classes and splits found, every image decoded through
the one image pipeline (deltapatch/data/images.py), duplicates resolved, splits assigned, and
``<split>/<class>/<sha256>.png`` + manifest.csv + task.yaml written (docs/ingestion.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from deltapatch.data.images import (
    FORMAT_NAMES,
    ImageTooLarge,
    UnreadableImage,
    decode_rgb,
    encode_png,
    resize,
)
from deltapatch.data.ingest.model import (
    IGNORED_NAMES,
    MANIFEST,
    MANIFEST_COLUMNS,
    TASK_YAML,
    TASK_YAML_KEYS,
    BadFile,
    DuplicateGroup,
    NormalisedImage,
    listing,
)
from deltapatch.data.splits import SPLITS, stratified_split
from deltapatch.data.versioning import DataSettings
from deltapatch.errors import DatasetError


def _visible(path: Path) -> bool:
    return not path.name.startswith((".", "._")) and path.name not in IGNORED_NAMES


def _children(folder: Path) -> tuple[list[Path], list[Path]]:
    """Visible sub-folders and files of `folder`, sorted by name."""
    entries = sorted((p for p in folder.iterdir() if _visible(p)), key=lambda p: p.name)
    return [p for p in entries if p.is_dir()], [p for p in entries if p.is_file()]


def dataset_root(tree: Path) -> Path:
    """Look through single wrapper folders (``foo.zip`` → ``foo/<class>/…``)."""
    top = tree
    while True:
        dirs, files = _children(top)
        if len(dirs) != 1 or files or dirs[0].name in SPLITS:
            return top
        inner_dirs, _ = _children(dirs[0])
        if not inner_dirs:  # a single class folder: keep it visible as one class
            return top
        top = dirs[0]


def read_task_yaml(top: Path) -> dict[str, Any]:
    """task.yaml beside the classes: {name?, description?, image_size?} (unknown keys refused)."""
    path = top / TASK_YAML
    if not path.is_file():
        return {}
    try:
        meta = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{TASK_YAML}: not valid YAML ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{TASK_YAML}: expected a mapping with keys {sorted(TASK_YAML_KEYS)}")
    unknown = sorted(set(meta) - TASK_YAML_KEYS)
    if unknown:
        raise DatasetError(f"{TASK_YAML}: unknown key(s) {unknown}; known keys: {sorted(TASK_YAML_KEYS)}")
    size = meta.get("image_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 1024):
        raise DatasetError(f"{TASK_YAML}: image_size={size!r} must be an integer from 8 to 1024")
    for key in ("name", "description"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DatasetError(f"{TASK_YAML}: {key} must be a string")
    return meta


def find_images(top: Path) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """Candidate files as (path relative to `top`, class, given split or None), and stray files.

    Raises DatasetError for an empty input, fewer than 2 classes, or split folders mixed with
    class folders.
    """
    dirs, top_files = _children(top)
    stray = [f.name for f in top_files if f.name != TASK_YAML]
    split_dirs = [d for d in dirs if d.name in SPLITS]
    if split_dirs:
        others = [d.name for d in dirs if d.name not in SPLITS]
        if others:
            raise DatasetError(
                f"{top}: mixes split folders ({', '.join(d.name for d in split_dirs)}) with other "
                f"folders ({', '.join(others)}); put every class under train/ (and val/, test/) or "
                "use no split folders at all"
            )
        if not any(d.name == "train" for d in split_dirs):
            raise DatasetError(f"{top}: has {split_dirs[0].name}/ but no train/; add train/<class>/ folders")
        groups: list[tuple[Path, str | None]] = []
        for split_dir in split_dirs:
            class_dirs, files = _children(split_dir)
            stray += [f"{split_dir.name}/{f.name}" for f in files]
            groups += [(d, split_dir.name) for d in class_dirs]
    else:
        groups = [(d, None) for d in dirs]
    candidates: list[tuple[str, str, str | None]] = [
        (path.relative_to(top).as_posix(), class_dir.name, split)
        for class_dir, split in groups
        for path in _files_under(class_dir)
    ]
    if not candidates:
        raise DatasetError(
            f"{top}: is empty (no files in class folders); expected <root>/<class>/<image> with "
            f"{FORMAT_NAMES} images"
        )
    classes = sorted({c for _, c, _ in candidates})
    if len(classes) < 2:
        found = f"only class {classes[0]!r}"
        raise DatasetError(
            f"{top}: has {found}; a task needs at least 2 classes: add one sub-folder per class "
            "(<root>/<class>/<image>)"
        )
    return candidates, stray


def _files_under(folder: Path) -> list[Path]:
    """Visible files below `folder` at any depth, sorted, skipping hidden folders."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if _visible(Path(d)))
        out += [Path(dirpath) / f for f in sorted(filenames) if _visible(Path(f))]
    return out



def normalise_all(
    top: Path, files: list[tuple[str, str, str | None]], settings: DataSettings, size: int, blobs: Path
) -> tuple[list[NormalisedImage], list[BadFile]]:
    """Decode every candidate; write each PNG once to ``blobs/<sha>.png``."""
    blobs.mkdir(parents=True, exist_ok=True)
    images, bad, too_large = [], [], []
    for rel, cls, split in files:
        try:
            png = encode_png(resize(decode_rgb(top / rel, int(settings.max_image_pixels)), size))
        except UnreadableImage as exc:
            bad.append(BadFile(rel, str(exc)))
            continue
        except ImageTooLarge as exc:
            too_large.append(f"{rel} ({exc})")
            continue
        sha = hashlib.sha256(png).hexdigest()
        blob = blobs / f"{sha}.png"
        if not blob.exists():
            blob.write_bytes(png)
        images.append(NormalisedImage(rel, cls, split, sha, blob))
    if too_large:
        raise DatasetError(
            f"{len(too_large)} image(s) above data.max_image_pixels={settings.max_image_pixels} "
            f"(decompression bomb?): {listing(too_large)}; downscale them or raise "
            "data.max_image_pixels in params.yaml"
        )
    return images, bad


def check_bad_fraction(bad: list[BadFile], total: int, settings: DataSettings) -> None:
    if bad and len(bad) / total > settings.max_bad_fraction:
        listed = [f"{b.path} ({b.reason})" for b in bad]
        raise DatasetError(
            f"{len(bad)} of {total} files ({len(bad) / total:.0%}) are unreadable, truncated or not "
            f"images, above data.max_bad_fraction={settings.max_bad_fraction}: {listing(listed)}; "
            "replace or remove them"
        )


def deduplicate(images: list[NormalisedImage]) -> tuple[list[NormalisedImage], list[tuple[NormalisedImage, NormalisedImage]]]:
    """Keep the first of identical images within one (class, given split).

    Returns (kept images, [(dropped repeat, the kept image it repeats)]).
    """
    kept: dict[tuple[str, str, str | None], NormalisedImage] = {}
    repeats = []
    for img in images:
        key = (img.sha256, img.cls, img.split)
        if key in kept:
            repeats.append((img, kept[key]))
        else:
            kept[key] = img
    return list(kept.values()), repeats


def duplicate_groups(kept: list[NormalisedImage], repeats: list[tuple[NormalisedImage, NormalisedImage]]) -> list[DuplicateGroup]:
    """Every content hash seen more than once, with the splits the copies ended up in."""
    by_sha: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for img in kept:
        by_sha[img.sha256].append((img.source, img.cls, str(img.split)))
    for dropped, original in repeats:
        by_sha[dropped.sha256].append((dropped.source, dropped.cls, str(original.split)))
    return [
        DuplicateGroup(
            sha,
            tuple(sorted(src for src, _, _ in group)),
            tuple(sorted({cls for _, cls, _ in group})),
            tuple(sorted({split for _, _, split in group})),
        )
        for sha, group in sorted(by_sha.items())
        if len(group) > 1
    ]


def check_classes(
    images: list[NormalisedImage], files: list[tuple[str, str, str | None]], settings: DataSettings
) -> list[str]:
    """Every class (folder) needs min_images_per_class usable images; returns the sorted classes."""
    classes = sorted({cls for _, cls, _ in files})
    counts = Counter(img.cls for img in images)
    low = [f"{c!r} has {counts[c]}" for c in classes if counts[c] < settings.min_images_per_class]
    if low:
        raise DatasetError(
            f"class(es) below data.min_images_per_class={settings.min_images_per_class} usable "
            f"images: {listing(low)}; add images to them (or lower the limit in params.yaml)"
        )
    return classes


def assign_splits(images: list[NormalisedImage], settings: DataSettings, seed: int) -> None:
    """Fill in missing splits (in place): all of them, or val/test carved from a given train."""
    given = {img.split for img in images}
    if given == {None}:
        pool, wanted = images, {"val": settings.val_fraction, "test": settings.test_fraction}
    else:
        missing = {"val", "test"} - given
        pool = [img for img in images if img.split == "train"]
        fractions = {"val": settings.val_fraction, "test": settings.test_fraction}
        wanted = {s: fractions[s] for s in missing}
        if not wanted:
            return
    # Order by content, not by file name or walk order: same content + seed → same split.
    pool = sorted(pool, key=lambda i: (i.cls, i.sha256, i.source))
    labels = [img.cls for img in pool]
    assigned = stratified_split(labels, wanted.get("val", 0.0), wanted.get("test", 0.0), seed)
    for img, split in zip(pool, assigned, strict=True):
        # stratified_split gives every split ≥ 1 sample per class; a split the user gave is not re-made.
        img.split = split if split == "train" or split in wanted else "train"


def write_task(
    folder: Path, images: list[NormalisedImage], task: str, meta: dict[str, Any], size: int, classes: list[str]
) -> tuple[str, dict[str, int]]:
    """Lay out ``<split>/<class>/<sha>.png``, manifest.csv and task.yaml; return (manifest sha, counts)."""
    rows = []
    for img in images:
        rel = f"{img.split}/{img.cls}/{img.sha256}.png"
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            shutil.copyfile(img.blob, target)
        rows.append((rel, img.cls, img.split, img.sha256))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path", ignore_index=True)
    manifest.to_csv(folder / MANIFEST, index=False, lineterminator="\n")
    counts = {s: int((manifest["split"] == s).sum()) for s in SPLITS}
    info = {
        "name": task,
        "description": meta.get("description") or "",
        "image_size": size,
        "classes": classes,
        "num_images": counts,
    }
    (folder / TASK_YAML).write_text(yaml.safe_dump(info, sort_keys=False, allow_unicode=True))
    return file_sha256(folder / MANIFEST), counts


def file_sha256(path: Path) -> str:
    """sha256 (64 hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(task_dir: Path) -> pd.DataFrame:
    """``manifest.csv`` of a task folder as a DataFrame with columns path, class, split, sha256."""
    return pd.read_csv(task_dir / MANIFEST, dtype=str, keep_default_na=False)

