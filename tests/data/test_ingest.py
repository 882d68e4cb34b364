"""Ingestion: every bad-input case is rejected with a specific message, quarantined, and leaves
data.dvc and git untouched; good inputs are normalised, split and versioned (real git + DVC)."""

from __future__ import annotations

import gzip
import hashlib
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from deltapatch.data.ingest import (
    MANIFEST_COLUMNS,
    RejectedInput,
    file_sha256,
    ingest,
    read_manifest,
    validate_task_name,
)
from deltapatch.data.versioning import list_versions
from deltapatch.errors import DatasetError

# ------------------------------------------------------------------------------------------ helpers


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root` (to prove an input was not modified)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def reject(project, state, path: Path, match: str, task: str | None = None) -> RejectedInput:
    """Ingest `path`, expect a rejection whose message contains `match`; check quarantine and git."""
    before = state(project)
    assert before[2] == "", "the test project must start with a clean git status"
    with pytest.raises(RejectedInput) as info:
        ingest(path, project, task=task)
    exc = info.value
    assert match in str(exc), str(exc)
    kept = exc.quarantine_dir
    assert kept is not None and kept.is_dir()
    assert kept.parent == Path(project["_root"]) / "data" / "quarantine"
    assert kept.name.endswith(f"-{path.name}")
    assert (kept / path.name).exists(), "the input itself is kept in quarantine"
    reason = (kept / "reason.txt").read_text()
    assert match in reason and str(path) in reason
    assert state(project) == before, "data.dvc, HEAD and git status must not change"
    assert not (Path(project["_root"]) / "data" / "tasks" / (task or path.name)).exists()
    return exc


def tar_with(path: Path, dataset: Path | None, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A .tar.gz of `dataset` (as <name>/…) plus hand-made members."""
    with tarfile.open(path, "w:gz") as tf:
        if dataset is not None:
            tf.add(dataset, arcname=dataset.name)
        for info, data in extra:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def zip_of(path: Path, dataset: Path, extra: list[tuple[zipfile.ZipInfo, bytes]] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(dataset.rglob("*")):
            if file.is_file():
                zf.write(file, f"{dataset.name}/{file.relative_to(dataset).as_posix()}")
        for info, data in extra:
            zf.writestr(info, data)
    return path


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width × height (a decompression-bomb shape); pixel data is junk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


# ---------------------------------------------------------------------------------- bad inputs


def test_missing_path_is_refused_without_quarantine(project, tmp_path):
    with pytest.raises(RejectedInput, match="no such file or folder") as info:
        ingest(tmp_path / "nope", project)
    assert info.value.quarantine_dir is None


def test_not_a_folder_or_supported_archive(project, state, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    reject(project, state, path, "not a folder or a supported archive (.zip, .tar, .tar.gz)", task="notes")


def test_corrupt_zip(project, state, tmp_path):
    path = tmp_path / "broken.zip"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    reject(project, state, path, "not a readable zip archive")


def test_empty_folder(project, state, tmp_path):
    path = tmp_path / "empty"
    (path / "a").mkdir(parents=True)
    (path / "b").mkdir()
    reject(project, state, path, "is empty (no files in class folders)")


def test_fewer_than_two_classes(project, state, make_dataset):
    path = make_dataset("single", classes=("only",), n=6)
    reject(project, state, path, "has only class 'only'; a task needs at least 2 classes")


def test_flat_folder_without_classes(project, state, tmp_path, image_writer):
    path = tmp_path / "flat"
    for i in range(6):
        image_writer(path / f"{i}.png", i)
    reject(project, state, path, "is empty (no files in class folders)")


def test_class_below_min_images(project, state, make_dataset, image_writer):
    path = make_dataset("small-class", classes=("a",), n=6)
    for i in range(3):
        image_writer(path / "b" / f"{i}.png", 100 + i)
    reject(project, state, path, "class(es) below data.min_images_per_class=5 usable images: 'b' has 3")


def test_too_many_bad_images_are_listed(project, state, make_dataset, image_writer):
    path = make_dataset("bad-images", n=6)
    (path / "a" / "garbage.png").write_bytes(b"\x00\x01random bytes")
    good = image_writer(path / "b" / "whole.png", 999).read_bytes()
    (path / "b" / "truncated.png").write_bytes(good[: len(good) // 2])
    (path / "b" / "whole.png").unlink()
    (path / "a" / "fake.jpg").write_text("I am text, not a JPEG")
    exc = reject(project, state, path, "3 of 15 files (20%) are unreadable, truncated or not images")
    message = str(exc)
    assert "above data.max_bad_fraction=0.1" in message
    for name in ("a/garbage.png", "b/truncated.png", "a/fake.jpg"):
        assert name in message


def test_image_above_pixel_limit(project, state, make_dataset):
    path = make_dataset("bomb", n=6)
    Image.new("L", (5000, 4000)).save(path / "a" / "huge.png")  # 20 MP > 16 MP, ~20 kB on disk
    reject(project, state, path, "above data.max_image_pixels=16000000 (decompression bomb?): a/huge.png")


def test_decompression_bomb_header(project, state, make_dataset):
    path = make_dataset("bomb-header", n=6)
    png_header(path / "b" / "bomb.png", 100_000, 100_000)  # PIL's own guard fires first
    reject(project, state, path, "(decompression bomb?): b/bomb.png")


def test_zip_member_with_dotdot(project, state, make_dataset, tmp_path):
    archive = zip_of(
        tmp_path / "evil-zip.zip", make_dataset("evil-zip"), [(zipfile.ZipInfo("../evil.txt"), b"x")]
    )
    exc = reject(
        project, state, archive, "unsafe archive, nothing was extracted: ../evil.txt ('..' in the path"
    )
    assert "re-create the archive" in str(exc)
    assert not (tmp_path / "evil.txt").exists()


def test_tar_member_with_dotdot(project, state, make_dataset, tmp_path):
    info = tarfile.TarInfo("evil-tar/a/../../../evil.txt")
    archive = tar_with(tmp_path / "evil-tar.tar.gz", make_dataset("evil-tar"), [(info, b"x")])
    reject(project, state, archive, "evil-tar/a/../../../evil.txt ('..' in the path")
    assert not (tmp_path / "evil.txt").exists()


def test_tar_absolute_member(project, state, make_dataset, tmp_path):
    target = tmp_path / "absolute-evil.txt"
    archive = tar_with(tmp_path / "abs.tar", make_dataset("abs"), [(tarfile.TarInfo(str(target)), b"x")])
    reject(project, state, archive, f"{target} (absolute path)")
    assert not target.exists()


def test_tar_symlink_member(project, state, make_dataset, tmp_path):
    info = tarfile.TarInfo("link/a/passwd.png")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = tar_with(tmp_path / "link.tar.gz", make_dataset("link"), [(info, None)])
    reject(project, state, archive, "link/a/passwd.png (symlink to /etc/passwd)")


def test_zip_symlink_member(project, state, make_dataset, tmp_path):
    info = zipfile.ZipInfo("zlink/a/passwd.png")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = zip_of(tmp_path / "zlink.zip", make_dataset("zlink"), [(info, b"/etc/passwd")])
    reject(project, state, archive, "zlink/a/passwd.png (symlink)")


def test_tar_hard_link_member(project, state, make_dataset, tmp_path):
    info = tarfile.TarInfo("hard/a/copy.png")
    info.type, info.linkname = tarfile.LNKTYPE, "hard/a/img0.png"
    archive = tar_with(tmp_path / "hard.tar", make_dataset("hard"), [(info, None)])
    reject(project, state, archive, "hard/a/copy.png (hard link to hard/a/img0.png)")


def test_tar_device_and_fifo_members(project, state, make_dataset, tmp_path):
    dev = tarfile.TarInfo("dev/a/null.png")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    fifo = tarfile.TarInfo("dev/b/pipe.png")
    fifo.type = tarfile.FIFOTYPE
    archive = tar_with(tmp_path / "dev.tar", make_dataset("dev"), [(dev, None), (fifo, None)])
    exc = reject(project, state, archive, "dev/a/null.png (device file)")
    assert "dev/b/pipe.png (FIFO)" in str(exc)


def test_folder_with_symlink(project, state, make_dataset):
    path = make_dataset("symlinked")
    (path / "a" / "passwd.png").symlink_to("/etc/passwd")
    exc = reject(project, state, path, "contains 1 symlink(s) or special file(s): a/passwd.png (symlink)")
    assert (exc.quarantine_dir / "symlinked" / "a" / "passwd.png").is_symlink(), "links are kept as links"


def test_invalid_task_name(project, state, make_dataset):
    path = make_dataset("Bad_Name")
    reject(project, state, path, "invalid task name 'Bad_Name'", task=None)
    assert "--task bad-name" in str(pytest.raises(DatasetError, validate_task_name, "Bad_Name").value)


def test_reserved_task_name(project, state, make_dataset):
    path = make_dataset("reserved")
    reject(project, state, path, "task name 'base' is reserved", task="base")


def test_rejected_input_from_inbox_is_moved(project, state, make_dataset):
    inbox = Path(project["_root"]) / "inbox"
    path = make_dataset("lonely", classes=("one",), where=inbox)
    exc = reject(project, state, path, "a task needs at least 2 classes")
    assert not path.exists(), "inputs delivered to the inbox are moved, not copied"
    assert "moved from the inbox" in (exc.quarantine_dir / "reason.txt").read_text()


def test_rejected_input_outside_inbox_is_untouched(project, state, make_dataset):
    path = make_dataset("keep-me", classes=("one",))
    before = tree_digest(path)
    reject(project, state, path, "a task needs at least 2 classes")
    assert tree_digest(path) == before


# ---------------------------------------------------------------------------------- good inputs


def test_new_task_layout_manifest_and_version(project, state, make_dataset):
    path = make_dataset("shapes", classes=("circle", "square", "star"), n=10)
    original = tree_digest(path)
    result = ingest(path, project)
    assert result.status == "new" and result.task == "shapes"
    assert result.classes == ["circle", "square", "star"]
    assert result.n_images == {"train": 18, "val": 6, "test": 6}  # per class: 6 / round(1.5) / round(1.5)
    manifest = read_manifest(result.task_dir)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert len(manifest) == 30 and manifest["path"].is_monotonic_increasing
    for row in manifest.itertuples():
        png = result.task_dir / row.path
        assert row.path == f"{row.split}/{row._2}/{row.sha256}.png"
        assert file_sha256(png) == row.sha256
        with Image.open(png) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (32, 32))
    per_class = manifest.groupby("class")["split"].agg(set)
    assert all(splits == {"train", "val", "test"} for splits in per_class), "stratified"
    assert result.manifest_sha256 == file_sha256(result.task_dir / "manifest.csv")
    version = result.data_version
    assert version.git_commit == state(project)[1] and version.task == "shapes"
    assert version.data_md5.endswith(".dir") and version.manifest_sha256 == result.manifest_sha256
    assert str(version) == f"{version.git_commit[:12]}:{version.data_md5}:{version.manifest_sha256[:12]}"
    assert state(project)[2] == "", "git status stays clean"
    assert list_versions(project, "shapes") == [version]
    assert tree_digest(path) == original, "the user's original is never modified"


def test_split_is_deterministic_given_seed(project, make_dataset, tmp_path):
    first = ingest(make_dataset("det", n=12), project)
    second = make_dataset("det", n=12, where=tmp_path / "copy")
    for i, img in enumerate(sorted((second / "a").glob("*.png"), reverse=True)):
        img.rename(img.with_name(f"renamed{i}.png"))  # same content, other file names and order
    again = ingest(second, project)
    assert again.status == "unchanged" and again.manifest_sha256 == first.manifest_sha256
    other_seed = ingest(second, dict(project, seed=123), task="det-seed")
    assert other_seed.status == "new", "another seed gives another split, hence other content"
    assert other_seed.manifest_sha256 != first.manifest_sha256


def test_existing_splits_are_respected(project, make_dataset):
    path = make_dataset("presplit", n=0, splits={"train": 6, "val": 2, "test": 3})
    result = ingest(path, project)
    assert result.n_images == {"train": 12, "val": 4, "test": 6}
    manifest = read_manifest(result.task_dir)
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_missing_val_is_carved_from_train(project, make_dataset):
    path = make_dataset("trainonly", n=0, splits={"train": 10, "test": 2})
    result = ingest(path, project)
    assert result.n_images["test"] == 4, "the given test split is kept as is"
    assert result.n_images["val"] == 4 and result.n_images["train"] == 16


def test_duplicates_across_splits_are_reported(project, make_dataset):
    path = make_dataset("leaky", n=0, splits={"train": 6, "test": 2})
    (path / "test" / "a" / "img0.png").write_bytes((path / "train" / "a" / "img3.png").read_bytes())
    (path / "train" / "b" / "copy.png").write_bytes((path / "train" / "b" / "img1.png").read_bytes())
    result = ingest(path, project)
    leaks = result.duplicates_across_splits
    assert len(leaks) == 1 and set(leaks[0].sources) == {"test/a/img0.png", "train/a/img3.png"}
    repeats = [d for d in result.duplicates if not d.across_splits]
    assert repeats and set(repeats[0].sources) == {"train/b/copy.png", "train/b/img1.png"}
    assert result.n_images["train"] + result.n_images["val"] == 12, "a repeat within a split is stored once"


def test_few_bad_images_are_skipped_and_kept(project, make_dataset):
    path = make_dataset("mostly-ok", n=7)
    (path / "a" / "broken.png").write_bytes(b"not an image")
    result = ingest(path, project)
    assert result.status == "new" and [b.path for b in result.skipped] == ["a/broken.png"]
    assert sum(result.n_images.values()) == 14
    assert (result.skipped_quarantine / "a" / "broken.png").read_bytes() == b"not an image"
    assert "a/broken.png" in (result.skipped_quarantine / "reason.txt").read_text()


def test_formats_and_colour_modes(project, image_writer, tmp_path):
    path = tmp_path / "modes"
    specs = [("JPEG", "RGB", "jpg"), ("BMP", "RGB", "bmp"), ("WEBP", "RGB", "webp"), ("PNG", "RGBA", "png"),
             ("PNG", "L", "png"), ("PNG", "P", "png"), ("PNG", "1", "png"), ("PNG", "I;16", "png"),
             ("JPEG", "CMYK", "jpg"), ("PNG", "LA", "png")]  # fmt: skip
    for i, (fmt, mode, ext) in enumerate(specs):
        for cls in ("x", "y"):
            image_writer(path / cls / f"{i}.{ext}", 50 * i + (cls == "y"), size=(40, 30), fmt=fmt, mode=mode)
    result = ingest(path, project)
    assert sum(result.n_images.values()) == 20 and not result.skipped
    for png in result.task_dir.rglob("*.png"):
        with Image.open(png) as im:
            assert (im.mode, im.size) == ("RGB", (32, 32))


def test_zip_with_wrapper_folder_and_task_yaml(project, make_dataset, tmp_path):
    path = make_dataset("wrapped")
    (path / "task.yaml").write_text("name: from-yaml\ndescription: toy task\nimage_size: 16\n")
    archive = zip_of(tmp_path / "upload.zip", path)
    result = ingest(archive, project)
    assert result.task == "from-yaml" and result.status == "new"
    info = (result.task_dir / "task.yaml").read_text()
    assert "description: toy task" in info and "image_size: 16" in info
    with Image.open(next(result.task_dir.rglob("*.png"))) as im:
        assert im.size == (16, 16)


def test_tar_gz_named_after_archive(project, make_dataset, tmp_path):
    archive = tar_with(tmp_path / "letters.tar.gz", make_dataset("inner"), [])
    assert ingest(archive, project).task == "letters"


def test_task_yaml_with_unknown_key_is_rejected(project, state, make_dataset):
    path = make_dataset("yaml-typo")
    (path / "task.yaml").write_text("nmae: typo\n")
    reject(project, state, path, "task.yaml: unknown key(s) ['nmae']")


# ---------------------------------------------------------------------------- re-arrivals


def test_same_content_twice_is_unchanged(project, state, make_dataset):
    path = make_dataset("again")
    first = ingest(path, project)
    after_first = state(project)
    second = ingest(path, project)
    assert second.status == "unchanged" and second.duplicate_of == "again"
    assert second.data_version == first.data_version
    assert state(project) == after_first, "no new commit, data.dvc unchanged"


def test_same_content_under_another_name_is_a_duplicate(project, state, make_dataset):
    path = make_dataset("orig")
    first = ingest(path, project)
    after_first = state(project)
    other = ingest(path, project, task="copy")
    assert other.status == "unchanged" and other.duplicate_of == "orig"
    assert other.data_version == first.data_version
    assert state(project) == after_first
    assert not (Path(project["_root"]) / "data" / "tasks" / "copy").exists()


def test_changed_content_is_a_new_version(project, state, make_dataset, image_writer):
    path = make_dataset("evolving")
    first = ingest(path, project)
    old_manifest = read_manifest(first.task_dir)
    image_writer(path / "a" / "img0.png", 4242)  # one image changes
    second = ingest(path, project)
    assert second.status == "new-version"
    assert second.previous_version == first.data_version
    assert second.data_version.git_commit != first.data_version.git_commit
    assert second.manifest_sha256 != first.manifest_sha256
    assert [v.manifest_sha256 for v in list_versions(project, "evolving")] == [
        second.manifest_sha256,
        first.manifest_sha256,
    ]
    assert state(project)[2] == ""
    assert not read_manifest(second.task_dir).equals(old_manifest)
    # the old version is still restorable: see test_versioning.py::test_checkout_restores_old_version
    assert isinstance(old_manifest, pd.DataFrame)


def test_archive_expanding_beyond_limit(project, state, make_dataset, tmp_path):
    path = make_dataset("zipbomb")
    with zipfile.ZipFile(tmp_path / "zipbomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for file in sorted(path.rglob("*.png")):
            zf.write(file, file.relative_to(path.parent).as_posix())
        zf.writestr("zipbomb/a/zeros.png", b"\0" * (2 * 2**20))  # 2 MiB of zeros, ~2 kB compressed
    small = dict(project, data=dict(project["data"], max_extract_mb=1))
    reject(
        small, state, tmp_path / "zipbomb.zip", "above data.max_extract_mb=1 in params.yaml (archive bomb?)"
    )


def with_data(project, **data):
    """`project` with some `data:` settings changed (a smaller budget keeps hostile archives small)."""
    return dict(project, data=dict(project["data"], **data))


def empty_members(prefix: str, count: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [(tarfile.TarInfo(f"{prefix}/a/empty{i}.txt"), b"") for i in range(count)]


def test_tar_with_too_many_members(project, state, make_dataset, tmp_path):
    # 51 empty files pass the byte budget, not the member count (a million of them: inodes, time)
    archive = tar_with(tmp_path / "many.tar.gz", make_dataset("many"), empty_members("many", 51))
    exc = reject(with_data(project, max_extract_members=50), state, archive,
                 "holds more than 50 members, above data.max_extract_members=50 in params.yaml")
    assert str(archive) in str(exc) and "raise the limit" in str(exc)


def test_zip_with_too_many_members(project, state, make_dataset, tmp_path):
    extra = [(zipfile.ZipInfo(f"zmany/a/empty{i}/"), b"") for i in range(51)]
    archive = zip_of(tmp_path / "zmany.zip", make_dataset("zmany"), extra)  # 12 images + 51 empty folders
    reject(with_data(project, max_extract_members=50), state, archive,
           "holds 63 members, above data.max_extract_members=50 in params.yaml")


def test_tar_gz_bomb_is_refused_before_it_is_decompressed(project, state, make_dataset, tmp_path):
    """A member header declaring 64 MiB (budget: 1 MiB) is refused at that header, while streaming.

    Only 256 KiB of the declared data follow, then the stream ends: a reader that decompresses the
    archive in full before checking (tarfile's getmembers() on a .tar.gz) hits the end of the data
    ("unexpected end of data") instead, so the budget message proves the data was never read through.
    """
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        tf.add(make_dataset("gzbomb"), arcname="gzbomb")
        end = tf.offset  # where the end-of-archive blocks go: the bomb goes there instead
    bomb = tarfile.TarInfo("gzbomb/a/zeros.png")
    bomb.size = 64 * 2**20
    body = raw.getvalue()[:end] + bomb.tobuf() + b"\0" * (256 * 2**10)
    archive = tmp_path / "gzbomb.tar.gz"
    archive.write_bytes(gzip.compress(body))
    exc = reject(with_data(project, max_extract_mb=1), state, archive,
                 "above data.max_extract_mb=1 in params.yaml (archive bomb?), refused at member "
                 "gzbomb/a/zeros.png before reading on")
    assert "unexpected end of data" not in str(exc)


def test_tar_gz_extended_header_bomb(project, state, make_dataset, tmp_path):
    """Bytes that no member's size declares (here a 2 MiB pax header, which tarfile reads into memory)
    count against the budget too, as they are decompressed."""
    note = tarfile.TarInfo("paxbomb/a/note.txt")
    note.pax_headers = {"comment": "x" * (2 * 2**20)}
    archive = tar_with(tmp_path / "paxbomb.tar.gz", make_dataset("paxbomb"), [(note, b"x")])
    exc = reject(with_data(project, max_extract_mb=1), state, archive,
                 "MiB (data.max_extract_mb=1 in params.yaml plus tar headers; archive bomb?)")
    assert "the archive decompresses to more than" in str(exc)
