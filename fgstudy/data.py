"""Datasets as whole normalised tensors on the device: seeded splits, downloads or an md5-checked mirror."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import struct
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from ._util import atomic_write_bytes, check_choice, check_positive, resolve_device

DATASETS = ("mnist", "fashion-mnist", "cifar10", "cifar10-jpeg", "synthetic")
MIRROR_ENV = "FGSTUDY_DATA_MIRROR"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
JPEG_TARBALL = "CIFAR10-jpeg/cifar10-jpeg.tar.gz"
JPEG_NOTE = "CIFAR-10 JPEG re-encoding (quality ~75) from the offline mirror, not the canonical pixels"
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# per-channel (mean, std) of the training images
STATS = {"mnist": ((0.1307,), (0.3081,)), "fashion-mnist": ((0.2860,), (0.3530,)),
         "cifar10": CIFAR10_STATS, "cifar10-jpeg": CIFAR10_STATS}
DEFAULT_VAL = {"mnist": 10_000, "fashion-mnist": 10_000, "cifar10": 5_000, "cifar10-jpeg": 5_000}
OFFLINE = f"offline mirror (${MIRROR_ENV}), md5-checked"   # captions name no machine path
FIX_MIRROR = f"pass mirror=... or set {MIRROR_ENV}=/path/to/shared/data"

Split = tuple[Tensor, Tensor]


class DataError(RuntimeError):
    """A dataset file is missing, corrupt or cannot be downloaded; the message says which and the fix."""


@dataclass
class Data:
    """Whole train/val/test splits as (x, y) tensors, plus where they came from and every cut made."""

    name: str
    train: Split
    val: Split
    test: Split
    in_shape: tuple[int, int, int]
    num_classes: int
    classes: list[str]
    source: str
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for captions: name, split sizes, source and notes."""
        sizes = f"train {len(self.train[0])} / val {len(self.val[0])} / test {len(self.test[0])}"
        notes = f"; notes: {'; '.join(self.notes)}" if self.notes else ""
        return f"{self.name}: {sizes}; source: {self.source}{notes}"


def load(name: str, root: str | os.PathLike = "data", *, val_size: int | None = None, seed: int = 0,
         device: str | torch.device = "auto", mirror: str | os.PathLike | None = None,
         train_size: int | None = None, test_size: int | None = None, **synthetic_kw) -> Data:
    """Load a dataset as normalised tensors on `device`, with a seeded val split of the official train set."""
    check_choice("dataset", name, DATASETS)
    if synthetic_kw and name != "synthetic":
        raise TypeError(f"dataset {name!r} takes no options {sorted(synthetic_kw)} (only 'synthetic' does)")
    root = Path(root)
    if name == "synthetic":
        raw = _synthetic(seed, **synthetic_kw)
    else:
        loader = _cifar10_jpeg if name == "cifar10-jpeg" else _torchvision
        raw = loader(name, root, _checked_mirror(mirror, root))
    val_size = raw.get("n_val", DEFAULT_VAL.get(name)) if val_size is None else val_size
    return _assemble(name, raw, val_size, train_size, test_size, seed, resolve_device(device))


def batches(x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None, drop_last: bool = False) -> Iterator[Split]:
    """Yield (x, y) minibatches: one randperm from `generator`, then index slices (no DataLoader overhead)."""
    check_positive("batch_size", batch_size, integer=True)
    if len(x) != len(y):
        raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    order = torch.randperm(len(x), generator=generator).to(x.device) if shuffle else None
    for start in range(0, stop, batch_size):
        idx = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
        yield x[idx], y[idx]


def _assemble(name: str, raw: dict, val_size: int, train_size: int | None, test_size: int | None, seed: int,
              device: torch.device) -> Data:
    """Split, subset, normalise and move to the device; record every cut in `notes`."""
    (x_pool, y_pool), (x_test, y_test) = raw["train"], raw["test"]
    n_pool, n_test = len(x_pool), len(x_test)
    check_positive("val_size", val_size, integer=True, allow_zero=True)
    val_size = int(val_size)                          # 100.0 is accepted as 100
    if val_size >= n_pool:
        raise ValueError(f"val_size {val_size} leaves no training data (official train set has {n_pool})")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_pool, generator=gen)
    val_idx, train_idx, test_idx = order[:val_size], order[val_size:], torch.arange(n_test)
    notes = list(raw["notes"])
    if val_size:
        notes.append(f"val {val_size} held out of the official train set {n_pool} (seed {seed})")
    if train_size is not None:
        train_idx = train_idx[:_subset_size("train_size", train_size, len(train_idx))]
        notes.append(f"train subset {len(train_idx)} of {n_pool - val_size} (seed {seed})")
    if test_size is not None:
        test_idx = torch.randperm(n_test, generator=gen)[:_subset_size("test_size", test_size, n_test)]
        notes.append(f"test subset {len(test_idx)} of {n_test} (seed {seed})")

    def prep(x: Tensor, y: Tensor, idx: Tensor) -> Split:
        x = x[idx].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()  # float inputs are already scaled
        if raw["stats"][0]:
            mean, std = (torch.tensor(s, device=device).view(1, -1, 1, 1) for s in raw["stats"])
            x = x.sub_(mean).div_(std)
        return x, y[idx].to(device, torch.int64)
    splits = prep(x_pool, y_pool, train_idx), prep(x_pool, y_pool, val_idx), prep(x_test, y_test, test_idx)
    classes = list(raw["classes"])
    return Data(name, *splits, tuple(x_pool.shape[1:]), len(classes), classes, raw["source"], notes)


def _subset_size(name: str, size: int, available: int) -> int:
    check_positive(name, size, integer=True)
    if size > available:
        raise ValueError(f"{name} {size} exceeds the {available} samples available")
    return int(size)


def _synthetic(seed: int, shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10,
               n_train: int = 256, n_val: int = 64, n_test: int = 64) -> dict:
    """Class-dependent mean pattern plus unit noise: learnable, tiny, deterministic in `seed`."""
    for key, val in dict(num_classes=num_classes, n_train=n_train, n_val=n_val, n_test=n_test).items():
        check_positive(key, val, integer=True, allow_zero=key == "n_val")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape!r}")
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, *shape, generator=gen)

    def draw(n: int) -> Split:
        y = torch.randint(num_classes, (n,), generator=gen)
        return (means[y] + torch.randn(n, *shape, generator=gen)) / 2**0.5, y
    return {"train": draw(n_train + n_val), "test": draw(n_test), "n_val": n_val, "stats": ((), ()),
            "classes": [f"class{i}" for i in range(num_classes)], "source": "synthetic",
            "notes": [f"synthetic data (seed {seed}), not a benchmark"]}


def _checked_mirror(mirror: str | os.PathLike | None, root: Path) -> Path | None:
    """The mirror (argument, else $FGSTUDY_DATA_MIRROR, else None: download), refusing a `root` inside it."""
    mirror = mirror or os.environ.get(MIRROR_ENV)
    if not mirror:
        return None
    mirror = Path(mirror)
    if not mirror.is_dir():
        raise DataError(f"data mirror {mirror} is not a directory; {FIX_MIRROR}")
    where, shared = root.resolve(), mirror.resolve()
    if where == shared or shared in where.parents:
        raise DataError(f"root {root} is the data mirror {mirror} or inside it; the loader writes into root "
                        "(unpacked and cached files), never into the mirror: pass another root, e.g. 'data'")
    return mirror


def _bad_md5(path: Path, got: str, want: str) -> str:
    """What is wrong with a file whose md5 is not the expected one."""
    size = path.stat().st_size
    return f"{path}: md5 mismatch, got {got}, expected {want} ({size} bytes: corrupt or truncated)" if size \
        else f"{path}: empty (0 bytes)"


def _stage(rel: str, md5: str, root: Path, mirror: Path | None) -> bool:
    """Make root/rel an md5-valid file, copying it from the mirror when absent or corrupt; True if copied."""
    dest = root / rel
    if dest.is_file():
        got = hashlib.md5(dest.read_bytes()).hexdigest()
        if got == md5:
            return False
        if mirror is None:
            raise DataError(f"{_bad_md5(dest, got, md5)}; delete {dest} and retry, or {FIX_MIRROR}")
        warnings.warn(f"{_bad_md5(dest, got, md5)}; replacing it with the mirror's copy", stacklevel=3)
    elif mirror is None:
        return False
    src = mirror / rel
    if not src.is_file():
        raise DataError(f"mirror file {src} is missing; restore the mirror or point "
                        f"mirror=... ({MIRROR_ENV}) to a full copy")
    data = src.read_bytes()
    got = hashlib.md5(data).hexdigest()
    if got != md5:
        raise DataError(f"mirror file {_bad_md5(src, got, md5)}; the mirror is damaged: restore it "
                        f"(cd mirror && md5sum -c MD5SUMS) or point mirror=... ({MIRROR_ENV}) to a good copy")
    atomic_write_bytes(dest, data)
    return True


def _torchvision(name: str, root: Path, mirror: Path | None) -> dict:
    """MNIST, Fashion-MNIST or CIFAR-10 as uint8 NCHW tensors via torchvision; mirror files md5-checked."""
    from torchvision import datasets
    cls = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}[name]
    staged = mirror is not None
    if name == "cifar10":  # a mirror rarely holds torchvision's tarball: use it if present, else download
        staged = staged and (mirror / cls.filename).is_file()
        if staged:
            _stage(cls.filename, cls.tgz_md5, root, mirror)
        fix = (f"connect to the internet, or put torchvision's {cls.filename} into {root}; offline, use "
               f"dataset 'cifar10-jpeg' (JPEG re-encoding) and {FIX_MIRROR}")
    else:
        for url, md5 in cls.resources:
            rel = f"{cls.__name__}/raw/{os.path.basename(url)}"
            gz, unpacked = root / rel, root / rel.removesuffix(".gz")
            stale = _stage(rel, md5, root, mirror)  # a fresh .gz makes the unpacked file stale
            if unpacked.exists() and not stale and gz.is_file():  # else compare sizes with the gzip trailer
                with open(gz, "rb") as fh:
                    fh.seek(-4, os.SEEK_END)
                    stale = unpacked.stat().st_size % 2**32 != struct.unpack("<I", fh.read(4))[0]
            if unpacked.exists() and stale:  # torchvision trusts an existing unpacked file: drop a stale one
                unpacked.unlink()
        fix = f"{FIX_MIRROR}, or delete {root / cls.__name__} and retry"
    source = OFFLINE if staged else f"torchvision download into {root}"
    out = {"stats": STATS[name], "notes": [], "source": source}
    for split in ("train", "test"):
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds = cls(str(root), train=split == "train", download=True)
        except Exception as err:  # RuntimeError, URLError, OSError, ...: network and disk trouble
            detail = " ".join(str(err).split())[:300] or type(err).__name__
            message = f"could not download or read {cls.__name__} into {root} (no network?): {detail}; {fix}"
            raise DataError(message) from err
        x = torch.as_tensor(ds.data)  # MNIST: N x H x W tensor, CIFAR-10: N x H x W x C array
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
        out[split], out["classes"] = (x, torch.as_tensor(ds.targets, dtype=torch.int64)), list(ds.classes)
    return out


def _cifar10_jpeg(name: str, root: Path, mirror: Path | None) -> dict:
    """CIFAR-10 from the mirror's JPEG tarball, decoded once and cached as uint8 tensors under root."""
    if mirror is None:  # only the cache of an earlier load can serve
        caches = sorted(root.glob("cifar10-jpeg-*.pt"))
        md5, cache = None, caches[0] if len(caches) == 1 else root / "cifar10-jpeg-<md5>.pt"
    else:
        sums = mirror / "MD5SUMS"
        if not sums.is_file():
            raise DataError(f"mirror file {sums} is missing; the mirror is incomplete: restore it or "
                            f"{FIX_MIRROR}")
        pairs = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
        md5 = {rel.strip().lstrip("*").removeprefix("./"): md5 for md5, rel in pairs}.get(JPEG_TARBALL)
        if md5 is None:
            raise DataError(f"mirror file {sums} has no entry for {JPEG_TARBALL}; restore the mirror")
        cache = root / f"cifar10-jpeg-{md5[:8]}.pt"
    tensors = _read_cache(cache)
    if tensors is None and md5 is None:
        raise DataError(f"cifar10-jpeg exists only in the offline mirror and no single valid cache "
                        f"{root}/cifar10-jpeg-<md5>.pt was found; {FIX_MIRROR}")
    if tensors is None:
        _stage(JPEG_TARBALL, md5, root, mirror)
        tensors = _decode_tarball(root / JPEG_TARBALL)
        buf = io.BytesIO()
        torch.save(tensors, buf)
        atomic_write_bytes(cache, buf.getvalue())
    source = f"{OFFLINE} (decoded cache {cache.name})" if md5 else f"decoded cache {cache.name}"
    return {"train": (tensors["train_x"], tensors["train_y"]), "test": (tensors["test_x"], tensors["test_y"]),
            "stats": STATS[name], "classes": list(CIFAR10_CLASSES), "notes": [JPEG_NOTE], "source": source}


def _read_cache(path: Path) -> dict | None:
    """A decoded cache, or None when absent; a broken cache is deleted (with a warning) and rebuilt."""
    if not path.is_file():
        return None
    try:
        tensors = torch.load(path, weights_only=True)
        if all(tensors[f"{s}_x"].dtype == torch.uint8 and len(tensors[f"{s}_x"]) == len(tensors[f"{s}_y"])
               for s in ("train", "test")):
            return tensors
    except Exception:  # truncated zip, unpickling error, missing key: all mean "rebuild"
        pass
    warnings.warn(f"{path}: unreadable or inconsistent cache; deleting it, decoding again", stacklevel=3)
    path.unlink()


def _decode_tarball(path: Path) -> dict[str, Tensor]:
    """Read every split/class/NNNN.jpg member, batch-decode with torchvision, order by (class, file name)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    found: dict[str, list[tuple[int, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            parts = Path(member.name.removeprefix("./")).parts
            if not member.isfile() or len(parts) != 3 or not parts[2].lower().endswith((".jpg", ".jpeg")):
                continue
            if parts[0] not in found or parts[1] not in CIFAR10_CLASSES:
                raise DataError(f"{path}: unexpected member {member.name}; expected train|test/<class>/*.jpg")
            blob = tar.extractfile(member).read()
            found[parts[0]].append((CIFAR10_CLASSES.index(parts[1]), parts[2], blob))
    out = {}
    for split, items in found.items():
        if not items:
            raise DataError(f"{path}: no {split}/<class>/*.jpg images; delete {path} and retry")
        items.sort(key=lambda item: item[:2])
        blobs = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for _, _, blob in items]
        # torchvision 0.29 deprecates its codecs in favour of TorchCodec
        with warnings.catch_warnings(action="ignore", category=DeprecationWarning):
            out[f"{split}_x"] = torch.stack(decode_jpeg(blobs, mode=ImageReadMode.RGB))
        out[f"{split}_y"] = torch.tensor([label for label, _, _ in items], dtype=torch.int64)
    return out
