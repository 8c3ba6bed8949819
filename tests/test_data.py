"""Tests for fgstudy.data: synthetic splits, batching, the md5-checked offline mirror, cifar10-jpeg decoding."""
from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from fgstudy import data
from fgstudy.data import DataError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")
MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(autouse=True)
def no_env_mirror(monkeypatch):
    """Tests choose their mirror explicitly; an inherited FGSTUDY_DATA_MIRROR must not leak in."""
    monkeypatch.delenv(data.MIRROR_ENV, raising=False)


@pytest.fixture
def real_mirror() -> Path:
    if not (MIRROR / "MNIST" / "raw").is_dir():
        pytest.skip(f"offline data mirror not found at {MIRROR} (expected ../shared/data next to the repo)")
    return MIRROR


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime, to prove nothing was written there."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def mnist_mirror(tmp_path: Path, real: Path) -> Path:
    """A private copy of the real mirror's MNIST files that a test may damage."""
    mirror = tmp_path / "mirror"
    (mirror / "MNIST" / "raw").mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copyfile(real / "MNIST" / "raw" / name, mirror / "MNIST" / "raw" / name)
    return mirror


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_shapes_and_dtypes():
    d = data.load("synthetic", device="cpu", shape=(3, 8, 8), num_classes=4, n_train=40, n_val=10, n_test=12)
    assert [len(s[0]) for s in (d.train, d.val, d.test)] == [40, 10, 12]
    assert d.train[0].shape == (40, 3, 8, 8) and d.train[0].dtype == torch.float32
    assert d.train[1].dtype == torch.int64 and int(d.train[1].max()) < 4
    assert d.in_shape == (3, 8, 8) and d.num_classes == 4 and len(d.classes) == 4
    assert "synthetic" in d.describe() and "train 40 / val 10 / test 12" in d.describe()


def test_synthetic_is_deterministic_in_seed():
    a, b, c = (data.load("synthetic", device="cpu", seed=s) for s in (0, 0, 1))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
    assert not torch.equal(a.train[0], c.train[0])


def test_seeded_split_partitions_the_train_pool():
    kw = dict(device="cpu", n_train=50, n_val=30, shape=(1, 4, 4))
    a, b = data.load("synthetic", **kw), data.load("synthetic", val_size=20, **kw)
    assert (len(a.train[0]), len(a.val[0])) == (50, 30) and (len(b.train[0]), len(b.val[0])) == (60, 20)
    rows = lambda d: {tuple(r.tolist()) for r in torch.cat([d.train[0], d.val[0]]).flatten(1)}  # noqa: E731
    assert len(rows(a)) == 80 and rows(a) == rows(b)  # same pool, only the cut moves


def test_train_and_test_subsets_are_noted():
    d = data.load("synthetic", device="cpu", train_size=100, test_size=16)
    assert len(d.train[0]) == 100 and len(d.test[0]) == 16 and len(d.val[0]) == 64
    assert any("train subset 100 of 256" in n for n in d.notes)
    assert any("test subset 16 of 64" in n for n in d.notes)


def test_synthetic_is_learnable_by_nearest_class_mean():
    d = data.load("synthetic", device="cpu")
    means = torch.stack([d.train[0][d.train[1] == k].mean(0) for k in range(10)]).flatten(1)
    pred = torch.cdist(d.test[0].flatten(1), means).argmin(1)
    assert (pred == d.test[1]).float().mean() > 0.9


@pytest.mark.parametrize("kw", [dict(val_size=-1), dict(val_size=320), dict(train_size=0), dict(train_size=10_000),
                                dict(test_size=65), dict(val_size=1.5), dict(n_train=0)])
def test_bad_sizes_raise_value_error(kw):
    with pytest.raises(ValueError):
        data.load("synthetic", device="cpu", **kw)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="cifar10-jpeg"):
        data.load("imagenet")


def test_synthetic_options_rejected_for_real_datasets():
    with pytest.raises(TypeError):
        data.load("mnist", shape=(1, 28, 28))


# ---------------------------------------------------------------------------------------------- batches


def test_batches_cover_every_sample_once():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    got = list(data.batches(x, y, 3, generator=torch.Generator().manual_seed(0)))
    assert [len(b[1]) for b in got] == [3, 3, 3, 1]
    seen = torch.cat([b[1] for b in got])
    assert sorted(seen.tolist()) == list(range(10)) and not torch.equal(seen, y)
    assert all(torch.equal(bx.view(-1).long(), by) for bx, by in got)


def test_batches_deterministic_given_generator():
    x, y = torch.randn(37, 2), torch.arange(37)
    def run(seed: int) -> torch.Tensor:
        return torch.cat([b for _, b in data.batches(x, y, 8, generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))


def test_batches_no_shuffle_and_drop_last():
    x, y = torch.randn(10, 2), torch.arange(10)
    got = [b for _, b in data.batches(x, y, 4, shuffle=False, drop_last=True)]
    assert [b.tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError):
        list(data.batches(x, y, 0))


# ---------------------------------------------------------------------------------------------- MNIST mirror


@pytest.mark.mirror
def test_mnist_from_real_mirror(tmp_path, real_mirror):
    before = snapshot(real_mirror)
    d = data.load("mnist", tmp_path / "root", mirror=real_mirror, device="cpu")
    assert [len(s[0]) for s in (d.train, d.val, d.test)] == [50_000, 10_000, 10_000]
    assert d.train[0].shape[1:] == (1, 28, 28) and d.in_shape == (1, 28, 28) and d.num_classes == 10
    assert abs(d.train[0].mean().item()) < 0.05 and abs(d.train[0].std().item() - 1) < 0.05
    assert d.test[1].dtype == torch.int64 and set(d.test[1].unique().tolist()) == set(range(10))
    assert d.source.startswith("offline mirror") and str(real_mirror) not in d.source
    other = data.load("mnist", tmp_path / "root", mirror=real_mirror, device="cpu", seed=1, train_size=10)
    assert torch.equal(other.test[0], d.test[0]) and not torch.equal(other.val[1], d.val[1])
    assert snapshot(real_mirror) == before


@pytest.mark.mirror
def test_corrupt_mirror_file_is_named(tmp_path, real_mirror):
    mirror = mnist_mirror(tmp_path, real_mirror)
    bad = mirror / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz") as err:
        data.load("mnist", tmp_path / "root", mirror=mirror, device="cpu")
    assert "mirror" in str(err.value) and "md5" in str(err.value)
    assert not (tmp_path / "root" / "MNIST" / "raw" / bad.name).exists()


@pytest.mark.mirror
def test_missing_mirror_file_is_named(tmp_path, real_mirror):
    mirror = mnist_mirror(tmp_path, real_mirror)
    (mirror / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is missing"):
        data.load("mnist", tmp_path / "root", mirror=mirror, device="cpu")


@pytest.mark.mirror
def test_corrupt_root_copy_is_replaced_from_env_mirror(tmp_path, real_mirror, monkeypatch):
    root = tmp_path / "root"
    data.load("mnist", root, mirror=real_mirror, device="cpu", train_size=10, test_size=10)
    copy = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    copy.write_bytes(copy.read_bytes()[:100])
    monkeypatch.setenv(data.MIRROR_ENV, str(real_mirror))
    with pytest.warns(UserWarning, match="replacing"):
        d = data.load("mnist", root, device="cpu", test_size=10)
    assert len(d.test[0]) == 10 and len(d.train[0]) == 50_000
    assert hashlib.md5(copy.read_bytes()).hexdigest() == "ec29112dd5afa0611ce80d1b7f02629c"


@pytest.mark.mirror
def test_corrupt_root_copy_without_mirror_says_delete(tmp_path, real_mirror):
    root = tmp_path / "root"
    data.load("mnist", root, mirror=real_mirror, device="cpu", train_size=10, test_size=10)
    copy = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    copy.write_bytes(b"")
    with pytest.raises(DataError, match=f"delete {copy}"):
        data.load("mnist", root, device="cpu")


@pytest.mark.mirror
def test_truncated_unpacked_file_is_re_extracted(tmp_path, real_mirror):
    root = tmp_path / "root"
    data.load("mnist", root, mirror=real_mirror, device="cpu", train_size=10, test_size=10)
    unpacked = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    unpacked.write_bytes(unpacked.read_bytes()[:500])
    assert len(data.load("mnist", root, device="cpu").test[1]) == 10_000


def test_missing_mirror_directory(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        data.load("mnist", tmp_path / "root", mirror=tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["mnist", "cifar10-jpeg", "cifar10"])
@pytest.mark.parametrize("inside", ["", "MNIST"])
def test_root_inside_the_mirror_is_refused_before_any_write(tmp_path, monkeypatch, name, inside):
    mirror = tmp_path / "mirror"
    (mirror / "MNIST").mkdir(parents=True)
    before = snapshot(mirror)
    with pytest.raises(DataError, match="never into the mirror"):
        data.load(name, mirror / inside, mirror=mirror, device="cpu")
    monkeypatch.setenv(data.MIRROR_ENV, str(mirror))                   # the same when the mirror comes from env
    with pytest.raises(DataError, match="is the data mirror"):
        data.load(name, mirror / inside / "." / "", device="cpu")
    assert snapshot(mirror) == before


def test_float_sizes_are_taken_as_whole_numbers():
    d = data.load("synthetic", device="cpu", n_train=40, n_val=10, val_size=5.0, train_size=20.0, test_size=8.0)
    assert [len(s[0]) for s in (d.train, d.val, d.test)] == [20, 5, 8]
    assert "train subset 20 of 45 (seed 0)" in d.notes and "test subset 8 of 64 (seed 0)" in d.notes


# ---------------------------------------------------------------------------------------------- cifar10-jpeg


def jpeg_mirror(tmp_path: Path, per_class: dict[str, int]) -> Path:
    """A tiny mirror in the real layout: class k's images are flat grey level 20*k+20, so labels can be checked."""
    from torchvision.io import encode_jpeg

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split, n in per_class.items():
            for k, cls in enumerate(data.CIFAR10_CLASSES):
                for i in range(n):
                    img = torch.full((3, 32, 32), 20 * k + 20, dtype=torch.uint8)
                    blob = encode_jpeg(img, quality=95).numpy().tobytes()
                    info = tarfile.TarInfo(f"{split}/{cls}/{i:04d}.jpg")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    mirror = tmp_path / "mirror"
    (mirror / "CIFAR10-jpeg").mkdir(parents=True)
    (mirror / data.JPEG_TARBALL).write_bytes(buf.getvalue())
    (mirror / "MD5SUMS").write_text(f"{hashlib.md5(buf.getvalue()).hexdigest()}  {data.JPEG_TARBALL}\n")
    return mirror


def grey_level(d: data.Data, x: torch.Tensor) -> torch.Tensor:
    """Undo normalisation of channel 0 and return each image's mean 0-255 level."""
    mean, std = data.STATS["cifar10-jpeg"]
    return (x[:, 0] * std[0] + mean[0]).mean((1, 2)) * 255


def test_cifar10_jpeg_small_tarball_and_cache(tmp_path):
    mirror = jpeg_mirror(tmp_path, {"train": 3, "test": 2})
    before = snapshot(mirror)
    root = tmp_path / "root"
    d = data.load("cifar10-jpeg", root, mirror=mirror, device="cpu", val_size=5, train_size=20, test_size=15)
    assert d.name == "cifar10-jpeg" and d.in_shape == (3, 32, 32) and d.classes == data.CIFAR10_CLASSES
    assert [len(s[0]) for s in (d.train, d.val, d.test)] == [20, 5, 15]
    assert any("JPEG" in n for n in d.notes) and "cifar10-jpeg" in d.describe()
    for x, y in (d.train, d.test):
        assert torch.allclose(grey_level(d, x), 20.0 * y + 20, atol=2)
    caches = list(root.glob("cifar10-jpeg-*.pt"))
    assert len(caches) == 1 and snapshot(mirror) == before
    # a second load comes from the cache alone, even with no tarball and no mirror
    (root / data.JPEG_TARBALL).unlink()
    again = data.load("cifar10-jpeg", root, device="cpu", val_size=5, train_size=20, test_size=15)
    assert torch.equal(again.train[0], d.train[0]) and torch.equal(again.test[1], d.test[1])


def test_cifar10_jpeg_broken_cache_is_rebuilt(tmp_path):
    mirror = jpeg_mirror(tmp_path, {"train": 1, "test": 1})
    root = tmp_path / "root"
    data.load("cifar10-jpeg", root, mirror=mirror, device="cpu", val_size=2)
    cache = next(root.glob("cifar10-jpeg-*.pt"))
    cache.write_bytes(cache.read_bytes()[:200])
    with pytest.warns(UserWarning, match="cache"):
        d = data.load("cifar10-jpeg", root, mirror=mirror, device="cpu", val_size=2)
    assert len(d.train[0]) == 8 and len(d.test[0]) == 10


def test_cifar10_jpeg_corrupt_tarball_is_named(tmp_path):
    mirror = jpeg_mirror(tmp_path, {"train": 1, "test": 1})
    tarball = mirror / data.JPEG_TARBALL
    tarball.write_bytes(tarball.read_bytes()[:-50])
    with pytest.raises(DataError, match="cifar10-jpeg.tar.gz"):
        data.load("cifar10-jpeg", tmp_path / "root", mirror=mirror, device="cpu", val_size=2)


def test_cifar10_jpeg_without_mirror_or_cache(tmp_path):
    with pytest.raises(DataError, match="FGSTUDY_DATA_MIRROR"):
        data.load("cifar10-jpeg", tmp_path / "root")
