"""Image sources for the statistics pass: folders, webdataset tar shards and in-memory uint8 arrays.

Every source knows its labels without decoding anything, names each item for reports, and hands the C++ decoder
either file locations (paths, or (tar path, byte offset, length) for tar members, read by C++ without the GIL) or
raw pixels (arrays, resized by the same C++ code). Formats are sniffed from bytes by the decoder, never from names.
"""

from __future__ import annotations

import glob
import os
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# File names ImageFolder picks up (torchvision's list). Only JPEG and PNG decode; the others are reported as skipped
# with "unsupported format" instead of silently vanishing from the class counts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


class Source:
    """Common interface: `len(src)`, `classes`, `class_to_idx`, `labels` (int64 [N]), `name(i)`, `subset(idx)`."""

    classes: list[str]
    class_to_idx: dict[str, int]
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def name(self, i: int) -> str:
        raise NotImplementedError

    def subset(self, indices) -> Source:
        """A view of this source holding items `indices` (in that order); labels and classes are kept."""
        return SubsetSource(self, indices)

    def _check_index(self, i: int) -> int:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a source of {n} items")
        return i % n

    def _decode_into(self, decoder, indices: np.ndarray, out: np.ndarray, resize: int, crop: int) -> list[str]:
        """Decode items `indices` into out uint8 [len(indices), crop, crop, 3]; one reason per item ('' = ok)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} items, {len(self.classes)} classes)"


def _normalise_indices(indices, n: int) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"boolean mask must have shape ({n},), got {idx.shape}")
        idx = np.nonzero(idx)[0]
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise TypeError(f"indices must be a 1-D integer sequence, got dtype {idx.dtype} and shape {idx.shape}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"indices out of range for a source of {n} items (min {idx.min()}, max {idx.max()})")
    return np.where(idx < 0, idx + n, idx)


class _FileSource(Source):
    """Sources whose items are encoded files: subclasses fill `_items` (decoder item per index)."""

    _items: list

    def _decode_into(self, decoder, indices, out, resize, crop):
        items = [self._items[i] for i in indices.tolist()]
        return decoder.decode_batch(items, out, resize, crop)


def display_name(path: str | bytes) -> str:
    """A printable form of a file name: bytes that are not UTF-8 (kept by the OS as surrogate escapes) are shown as
    backslash escapes (`b'\\xff\\xfe.jpg'` -> `\\xff\\xfe.jpg`), so every name can be printed and logged."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    for test, name in _SPECIAL_KINDS:
        if test(mode):
            return name
    return "not a regular file"


class _Walk:
    """A deterministic walk of one class folder: sorted, hidden entries skipped, symlinks followed once.

    Every directory is entered at most once (by device and inode), so a symlink loop or a second link to the same
    folder is reported instead of followed; unreadable folders, dangling symlinks and special files (FIFO, socket,
    device) named like images are reported with a reason and never opened. `problems` collects (name, reason)."""

    def __init__(self, root: Path):
        self.root = root
        self.seen_dirs: set[tuple[int, int]] = set()
        self.problems: list[tuple[str, str]] = []

    def _rel(self, path: str) -> str:
        return display_name(os.path.relpath(path, self.root))

    def enter(self, path: str) -> bool:
        """Mark `path` (a directory) as visited; False (with a problem recorded) if it was already."""
        try:
            st = os.stat(path)
        except OSError as exc:
            self.problems.append((self._rel(path), f"cannot read folder: {exc.strerror or exc}"))
            return False
        key = (st.st_dev, st.st_ino)
        if key in self.seen_dirs:
            target = display_name(os.path.realpath(path))
            self.problems.append((self._rel(path), f"symlink loop or duplicate folder (-> {target}): not followed"))
            return False
        self.seen_dirs.add(key)
        return True

    def files(self, folder: str) -> list[str]:
        """Image-looking regular files under `folder` (recursively), sorted per folder, directories in name order."""
        out: list[str] = []
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            self.problems.append((self._rel(folder), f"cannot read folder: {exc.strerror or exc}"))
            return out
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                # plain folders and files are told apart by the directory entry's type (no stat call per file);
                # symlinks and anything else are stat-ed, following links
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                    continue
                if entry.is_file(follow_symlinks=False):
                    if entry.name.lower().endswith(IMG_EXTENSIONS):
                        out.append(entry.path)
                    continue
                st = entry.stat()
            except OSError as exc:
                if entry.is_symlink():
                    target = display_name(os.readlink(entry.path)) if os.path.islink(entry.path) else "?"
                    self.problems.append((self._rel(entry.path), f"dangling symlink (-> {target})"))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    self.problems.append((self._rel(entry.path), f"cannot stat: {exc.strerror or exc}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.path)
            elif entry.name.lower().endswith(IMG_EXTENSIONS):
                if stat.S_ISREG(st.st_mode):
                    out.append(entry.path)
                else:
                    self.problems.append((self._rel(entry.path), f"{_kind(st.st_mode)}, not an image file: not opened"))
        for sub in subdirs:
            if self.enter(sub):
                out.extend(self.files(sub))
        return out


class ImageFolder(_FileSource):
    """Images in `root/<class>/**/<file>`: class = sub-folder (sorted names), files sorted within a class.

    Attributes: `root`, `classes`, `class_to_idx`, `labels` int64 [N], `paths` (list[str], absolute; names the OS
    holds as non-UTF-8 bytes are kept as surrogate escapes, `os.fsencode` gives the bytes back), `problems`
    (list of (name, reason): unreadable folders, symlink loops, dangling symlinks, special files), `empty_classes`
    (class names with no image file). Only image-looking files (IMG_EXTENSIONS, any case) are listed; hidden files
    and folders are ignored; special files (FIFO, socket, device) are listed as problems and never opened; every
    folder is entered once, so symlink loops end. `name(i)` is printable (`display_name`).
    """

    def __init__(self, root: str | os.PathLike):
        root_path = Path(root)
        if not root_path.exists():
            raise FileNotFoundError(f"ImageFolder: root {display_name(str(root_path))!r} does not exist")
        if not root_path.is_dir():
            raise NotADirectoryError(f"ImageFolder: root {display_name(str(root_path))!r} is not a directory")
        self.root = root_path
        walk = _Walk(root_path)
        walk.enter(str(root_path))
        try:
            with os.scandir(root_path) as it:
                top = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            raise PermissionError(f"ImageFolder: cannot read root {display_name(str(root_path))!r}: "
                                  f"{exc.strerror or exc}") from None
        classes = []
        for entry in top:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                classes.append(entry.name)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                walk.problems.append((display_name(entry.name), "dangling symlink where a class folder may be"))
        if not classes:
            raise ValueError(f"ImageFolder: no class sub-folders in {display_name(str(root_path))!r} "
                             "(expected root/<class>/<image>)")
        paths: list[str] = []
        labels: list[int] = []
        empty: list[str] = []
        for label, cls in enumerate(classes):
            folder = os.path.join(root_path, cls)
            found = walk.files(folder) if walk.enter(folder) else []
            if not found:
                empty.append(cls)
            paths.extend(found)
            labels.extend([label] * len(found))
        if not paths:
            raise ValueError(
                f"ImageFolder: no image files ({', '.join(IMG_EXTENSIONS)}) under the {len(classes)} class folders "
                f"of {display_name(str(root_path))!r}" + _problem_note(walk.problems)
            )
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.problems = walk.problems
        self.empty_classes = empty
        self._items = paths

    def name(self, i: int) -> str:
        return display_name(os.path.relpath(self.paths[self._check_index(i)], self.root))


def _problem_note(problems: list[tuple[str, str]]) -> str:
    if not problems:
        return ""
    shown = "; ".join(f"{n}: {r}" for n, r in problems[:3])
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return f" (listing problems: {shown}{more})"


def check_classes_nonempty(source: Source, where: str) -> None:
    """Raise ValueError naming every class of `source` that holds no item (before any decoding), with the listing
    problems (unreadable folders, loops, special files) that may explain it."""
    counts = np.bincount(np.asarray(source.labels, dtype=np.int64), minlength=len(source.classes))
    empty = [source.classes[c] for c in np.flatnonzero(counts == 0).tolist()]
    if empty:
        shown = ", ".join(repr(display_name(c)) for c in empty[:10]) + (" ..." if len(empty) > 10 else "")
        root = source
        while hasattr(root, "parent"):
            root = root.parent
        raise ValueError(f"{where}: no image in class {shown} ({len(empty)} of {len(source.classes)} classes "
                         f"empty)" + _problem_note(list(getattr(root, "problems", []))))


def _expand_tar_paths(paths_or_glob) -> list[str]:
    if isinstance(paths_or_glob, (str, os.PathLike)):
        pattern = os.fspath(paths_or_glob)
        if any(ch in pattern for ch in "*?["):
            paths = sorted(glob.glob(pattern))
            if not paths:
                raise FileNotFoundError(f"TarShards: no files match {pattern!r}")
        elif os.path.isdir(pattern):
            paths = sorted(glob.glob(os.path.join(pattern, "*.tar")))
            if not paths:
                raise FileNotFoundError(f"TarShards: no *.tar files in directory {pattern!r}")
        else:
            paths = [pattern]
    else:
        paths = [os.fspath(p) for p in paths_or_glob]
        if not paths:
            raise ValueError("TarShards: empty list of shard paths")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"TarShards: shard {p!r} does not exist")
    return paths


class TarShards(_FileSource):
    """Webdataset-layout tar shards: members `{key}.jpg|jpeg|png` with `{key}.cls` (an integer class index).

    `paths_or_glob`: a glob pattern ("shards/train-*.tar"), a directory (all its *.tar), one path or a list of paths.
    Shards must be uncompressed tars (members are read in place by byte offset). `classes`: optional class names
    (default: "0".."C-1" with C = max label + 1). Items are ordered by shard, then by position in the shard.
    """

    def __init__(self, paths_or_glob, classes: Sequence[str] | None = None):
        self.shards = _expand_tar_paths(paths_or_glob)
        items: list[tuple[str, int, int]] = []
        names: list[str] = []
        labels: list[int] = []
        for shard in self.shards:
            try:
                tar = tarfile.open(shard, mode="r:")
            except tarfile.ReadError as exc:
                raise ValueError(f"TarShards: {shard!r} is not an uncompressed tar file ({exc})") from exc
            with tar:
                images: dict[str, tarfile.TarInfo] = {}
                cls: dict[str, int] = {}
                order: list[str] = []
                for member in tar:
                    if not member.isfile():
                        continue
                    head, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    key = os.path.join(head, stem)
                    ext = ext.lower()
                    if ext in TAR_IMAGE_EXTENSIONS:
                        if key in images:
                            raise ValueError(f"TarShards: {shard!r} holds two images for key {key!r}")
                        images[key] = member
                        order.append(key)
                    elif ext == "cls":
                        raw = tar.extractfile(member).read().decode("utf-8", "replace").strip()
                        try:
                            cls[key] = int(raw)
                        except ValueError as exc:
                            raise ValueError(
                                f"TarShards: {shard}:{member.name} must hold an integer class index, got {raw!r}"
                            ) from exc
                for key in order:
                    if key not in cls:
                        raise ValueError(f"TarShards: {shard}:{images[key].name} has no matching {key}.cls label")
                    member = images[key]
                    items.append((shard, int(member.offset_data), int(member.size)))
                    names.append(f"{os.path.basename(shard)}:{member.name}")
                    labels.append(cls[key])
        if not items:
            raise ValueError(f"TarShards: no {{key}}.jpg|jpeg|png + {{key}}.cls pairs in {self.shards}")
        label_arr = np.asarray(labels, dtype=np.int64)
        if label_arr.min() < 0:
            raise ValueError(f"TarShards: negative class index {int(label_arr.min())}")
        if classes is None:
            classes = [str(i) for i in range(int(label_arr.max()) + 1)]
        classes = [str(c) for c in classes]
        if int(label_arr.max()) >= len(classes):
            raise ValueError(f"TarShards: class index {int(label_arr.max())} but only {len(classes)} classes given")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.labels = label_arr
        self._items = items
        self._names = names

    def name(self, i: int) -> str:
        return display_name(self._names[self._check_index(i)])


class ArraySource(Source):
    """In-memory uint8 images [N, H, W] (grayscale, replicated to RGB) or [N, H, W, 3] with int labels [N].

    `classes`: class names (default "0".."C-1", C = max label + 1). Items go through the same C++ resize + crop as
    decoded files. The arrays are kept by reference (not copied).
    """

    def __init__(self, images, labels, classes: Sequence[str] | None = None):
        if hasattr(images, "detach") and hasattr(images, "numpy"):  # a torch tensor
            images = images.detach().cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise TypeError(f"ArraySource: images must be a numpy array or torch tensor, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise TypeError(f"ArraySource: images must be uint8, got {images.dtype}")
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"ArraySource: images must have shape [N, H, W] or [N, H, W, 3], got {images.shape}")
        if images.shape[1] < 1 or images.shape[2] < 1:
            raise ValueError(f"ArraySource: empty images of shape {images.shape}")
        if hasattr(labels, "detach") and hasattr(labels, "numpy"):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"ArraySource: labels must have shape ({images.shape[0]},), got {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"ArraySource: labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(f"ArraySource: negative label {int(labels.min())}")
        if classes is None:
            classes = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        classes = [str(c) for c in classes]
        if labels.size and int(labels.max()) >= len(classes):
            raise ValueError(f"ArraySource: label {int(labels.max())} but only {len(classes)} classes")
        self.images = images
        self.labels = labels
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}

    def name(self, i: int) -> str:
        return f"array[{self._check_index(i)}]"

    def _decode_into(self, decoder, indices, out, resize, crop):
        batch = np.ascontiguousarray(self.images[indices])
        return decoder.resize_batch(batch, out, resize, crop)


class SubsetSource(Source):
    """Items `indices` of `parent`, in that order (what `Source.subset` returns)."""

    def __init__(self, parent: Source, indices):
        self.parent = parent
        self.indices = _normalise_indices(indices, len(parent))
        self.labels = parent.labels[self.indices]
        self.classes = parent.classes
        self.class_to_idx = parent.class_to_idx

    def name(self, i: int) -> str:
        return self.parent.name(int(self.indices[self._check_index(i)]))

    def subset(self, indices) -> Source:
        return SubsetSource(self.parent, self.indices[_normalise_indices(indices, len(self))])

    def _decode_into(self, decoder, indices, out, resize, crop):
        return self.parent._decode_into(decoder, self.indices[indices], out, resize, crop)
