"""Datasets through their public entry points (real file formats, generated here), splits and augmentation."""
from __future__ import annotations

import hashlib
import io
import pickle
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from uhkd.config import DataConfig
from uhkd.data import CIFAR100, ImageNet, MNIST5k, download_cifar100, get_dataset, load_split, split_indices
from uhkd.data.augment import RECIPES, Recipe, image_transform, mix, mix_and_erase, random_erase
from uhkd.data.device import apply_op, rand_augment, resize, train_batch
from uhkd.data.loader import WorkerData
from uhkd.errors import UserError

N_TRAIN, N_TEST = 30, 12


def _cifar_batch(n: int, seed: int, bytes_keys: bool) -> tuple[dict, np.ndarray, np.ndarray]:
    """A CIFAR-100 pickle dict as the official archive holds it (1024 R, 1024 G, 1024 B per row)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 100, n).tolist()
    batch = {"data": data, "fine_labels": labels, "coarse_labels": [l // 5 for l in labels],
             "filenames": [f"img{i}.png" for i in range(n)], "batch_label": "training batch 1 of 1"}
    if bytes_keys:  # what python 2's cPickle wrote (the official archive)
        batch = {k.encode(): (v.encode() if isinstance(v, str) else v) for k, v in batch.items()}
    return batch, data, np.asarray(labels)


def _write_cifar(root, *, bytes_keys: bool, archive: bool):
    train, train_data, train_labels = _cifar_batch(N_TRAIN, 1, bytes_keys)
    test, _, _ = _cifar_batch(N_TEST, 2, bytes_keys)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    files = {name: pickle.dumps(obj, protocol=2) for name, obj in
             (("train", train), ("test", test), ("meta", meta))}
    if archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, raw in files.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    else:
        (root / "cifar-100-python").mkdir()
        for name, raw in files.items():
            (root / "cifar-100-python" / name).write_bytes(raw)
    return train_data, train_labels


@pytest.mark.parametrize("bytes_keys", [True, False])
@pytest.mark.parametrize("archive", [True, False])
def test_cifar100_reads_the_real_format(tmp_path, bytes_keys, archive):
    data, labels = _write_cifar(tmp_path, bytes_keys=bytes_keys, archive=archive)
    train = CIFAR100(str(tmp_path), train=True)
    assert len(train) == N_TRAIN and len(CIFAR100(str(tmp_path), train=False)) == N_TEST
    image, label = train[3]
    assert image.size == (32, 32) and label == labels[3]
    pixels = np.asarray(image)
    assert pixels[5, 7, 0] == data[3, 5 * 32 + 7] and pixels[5, 7, 2] == data[3, 2048 + 5 * 32 + 7]
    tensor, _ = CIFAR100(str(tmp_path), transform=lambda im: torch.tensor(np.asarray(im)))[3]
    assert torch.equal(tensor, torch.from_numpy(pixels.copy()))


def test_cifar100_accepts_the_folder_or_archive_itself(tmp_path):
    _write_cifar(tmp_path, bytes_keys=True, archive=True)
    assert len(CIFAR100(str(tmp_path / "cifar-100-python.tar.gz"))) == N_TRAIN
    folder = tmp_path / "f"
    folder.mkdir()
    _write_cifar(folder, bytes_keys=False, archive=False)
    assert len(CIFAR100(str(folder / "cifar-100-python"), train=False)) == N_TEST


def test_cifar100_missing_or_corrupted_is_one_line(tmp_path):
    with pytest.raises(UserError, match="CIFAR-100 not found at .*expected cifar-100-python/") as err:
        CIFAR100(str(tmp_path))
    assert "\n" not in str(err.value)
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(UserError, match="cannot read CIFAR-100 'train' from .*cifar-100-python.tar.gz") as err:
        CIFAR100(str(tmp_path))
    assert "\n" not in str(err.value)
    folder = tmp_path / "x" / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "fine_labels": [1, 2]}))
    with pytest.raises(UserError, match=r"corrupted CIFAR-100 file .*expected uint8 data \(N, 3072\)"):
        CIFAR100(str(folder))


def test_download_checks_md5(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    _write_cifar(source, bytes_keys=True, archive=True)
    archive = source / "cifar-100-python.tar.gz"
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    with pytest.raises(UserError, match=f"md5 {md5}, expected 0+"):
        download_cifar100(str(tmp_path / "bad"), url=archive.as_uri(), md5="0" * 32)
    assert not list((tmp_path / "bad").iterdir())  # the partial file is removed
    got = download_cifar100(str(tmp_path / "ok"), url=archive.as_uri(), md5=md5)
    assert got.read_bytes() == archive.read_bytes()
    assert len(CIFAR100(str(tmp_path / "ok"), train=False)) == N_TEST


def _write_folders(root, classes=("n01", "n02", "n03"), per_class=3):
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for i, cls in enumerate(classes):
            (root / part / cls).mkdir(parents=True)
            for j in range(per_class):
                image = Image.fromarray(rng.integers(0, 256, (20 + j, 24, 3), dtype=np.uint8))
                image.save(root / part / cls / f"{j}.{'jpg' if j % 2 else 'png'}")


def test_imagenet_class_folders(tmp_path):
    _write_folders(tmp_path)
    train = ImageNet(str(tmp_path), train=True)
    assert len(train) == 9 and train.classes == ["n01", "n02", "n03"]
    image, label = train[4]
    assert image.mode == "RGB" and label == 1
    train, evalset = load_split("imagenet1k", str(tmp_path), "final")
    assert len(train) == len(evalset) == 9
    (tmp_path / "val" / "n04").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "n04" / "a.png")
    with pytest.raises(UserError, match=r"ImageNet-1K at .*: train/ has 3 class folders and val/ 4; they must be the "
                                         r"same \(labels follow the sorted folder names\): 1 only in val/: n04$"):
        load_split("imagenet1k", str(tmp_path), "final")
    (tmp_path / "train" / "n01" / "0.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read image .*0.png"):
        ImageNet(str(tmp_path))[0]
    with pytest.raises(UserError, match="ImageNet-1K not found at .*expected .*train/<class>/<image>"):
        load_split("imagenet1k", str(tmp_path / "nowhere"), "final")


def test_mnist5k_offline_split():
    train, test = MNIST5k(train=True), MNIST5k(train=False)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test.labels).tolist() == [100] * 10 and np.bincount(train.labels).tolist() == [400] * 10
    assert train.images.shape == (4000, 28, 28, 3) and train.images.dtype == np.uint8
    assert np.array_equal(train.images[..., 0], train.images[..., 2])
    assert np.array_equal(MNIST5k(train=False).images, test.images)  # deterministic
    assert not set(map(bytes, test.images[:50])) & set(map(bytes, train.images))  # disjoint
    info = get_dataset("mnist5k")
    assert info.num_classes == 10 and info.in_memory


def test_tune_split_is_seeded_and_disjoint():
    train_idx, val_idx = split_indices(1000, 0.1)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert not set(train_idx) & set(val_idx) and set(train_idx) | set(val_idx) == set(range(1000))
    assert np.array_equal(split_indices(1000, 0.1)[1], val_idx)
    train, held_out = load_split("mnist5k", "", "tune")
    assert (len(train), len(held_out)) == (3600, 400)
    full = MNIST5k(train=True)
    assert np.array_equal(held_out.images, full.images[split_indices(4000, 0.1)[1]])
    small_train, small_eval = load_split("mnist5k", "", "final", limit_train=100, limit_eval=50)
    assert (len(small_train), len(small_eval)) == (100, 50) and len(set(small_eval.labels)) > 5


def _batch(n=8, size=28):
    image = np.asarray(MNIST5k(train=False).images[:1]).repeat(n, 0)
    return torch.from_numpy(image).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_device_batch_augmentation_is_per_sample(name):
    torch.manual_seed(0)
    out = train_batch(_batch(16), RECIPES[name], 32)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(1)
    distinct = {tuple(row.round(decimals=4).tolist()) for row in flat}
    assert len(distinct) == 16  # the same image, augmented differently per sample


def test_plain_resize_and_eval_path():
    x = _batch(2)
    assert torch.equal(train_batch(x, RECIPES["none"], 28), x.float() / 255)
    up = resize(x, 56)
    assert up.shape == (2, 3, 56, 56) and torch.allclose(up[0], up[1])
    pil = image_transform(RECIPES["cnn"], 56, train=False)(Image.fromarray(x[0].permute(1, 2, 0).numpy()))
    assert (pil - up[0]).abs().mean() < 0.02  # the PIL and on-device evaluation resizes agree


def test_rand_augment_ops_match_pil():
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    arrays[1] //= 3  # a low-contrast image
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255
    level, sign = torch.full((3,), 0.6), torch.ones(3)
    for op, pil in [("Equalize", ImageOps.equalize), ("Invert", ImageOps.invert),
                    ("PosterizeIncreasing", lambda im: ImageOps.posterize(im, 4 - int(0.6 * 4))),
                    ("SolarizeIncreasing", lambda im: ImageOps.solarize(im, 256 - int(0.6 * 256)))]:
        got = (apply_op(x, op, level, sign) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        want = np.stack([np.asarray(pil(Image.fromarray(a))) for a in arrays])
        assert np.array_equal(got, want), op
    rotated = apply_op(x, "Rotate", torch.ones(3), sign)  # 30 degrees: corners become the grey fill
    assert torch.allclose(rotated[:, :, 0, 0], torch.full((3, 3), 128 / 255), atol=0.02)
    torch.manual_seed(0)
    assert rand_augment(x).shape == x.shape


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_equal_timm_batch_mode(mixup, cutmix):
    """The on-device mixing against timm's own `Mixup` (default mode "batch": one λ and one mixup-or-cutmix choice
    per batch) on the same inputs and numpy seed: identical images and soft targets."""
    from timm.data import Mixup

    images, labels = torch.rand(6, 3, 16, 20, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    recipe = Recipe(False, False, mixup=mixup, cutmix=cutmix, erase=0.0)
    timm_mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.0, num_classes=10)
    kinds = set()
    for seed in range(12):
        np.random.seed(seed)
        mixed, target = mix(images, labels, recipe, 10)
        np.random.seed(seed)
        want_images, want_target = timm_mix(images.clone(), labels)
        assert torch.allclose(mixed, want_images, atol=1e-6) and torch.allclose(target, want_target, atol=1e-6)
        partner = target[torch.arange(6), labels.flip(0)]
        assert torch.allclose(partner, partner[0].expand(6))  # one draw for the whole batch
        kinds.add("cutmix" if ((mixed == images) | (mixed == images.flip(0))).all() else "mixup")
    assert kinds == {k for k, a in (("mixup", mixup), ("cutmix", cutmix)) if a > 0}
    _, soft = mix_and_erase(images, labels, RECIPES["vit"], 10, (0.5,) * 3, (0.25,) * 3)
    assert soft.shape == (6, 10)
    assert mix_and_erase(images, labels, RECIPES["cnn"], 10, (0.5,) * 3, (0.25,) * 3)[1] is labels


def test_random_erasing_equals_timm():
    """Against timm's `RandomErasing(mode="pixel")` on the same images (ours in [0, 1], timm's normalised) and the
    same Python seed: the same boxes, and inside them per-pixel N(0, 1) noise in the normalised space."""
    from timm.data.random_erasing import RandomErasing

    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    images = torch.rand(24, 3, 20, 28, generator=torch.Generator().manual_seed(0))
    normalised = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    random.seed(5)
    ours = random_erase(images, 0.5, mean.tolist(), std.tolist())
    random.seed(5)
    theirs = RandomErasing(0.5, mode="pixel", device="cpu")(normalised.clone())
    erased = (ours != images).any(1)
    assert torch.equal(erased, (theirs != normalised).any(1)) and 4 < erased.flatten(1).any(1).sum() < 20
    noise = ((ours - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).permute(1, 0, 2, 3)[:, erased]
    assert noise.numel() > 3000 and abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1
    assert torch.equal(random_erase(images, 0.0, mean.tolist(), std.tolist()), images)


def test_shear_pivots_about_the_top_left_corner_as_pil():
    """timm's PIL ShearX/ShearY (x_in = x + f·y about the top-left corner) against the on-device op on a smooth
    image: close to PIL's result, far from a shear about the centre."""
    from timm.data.auto_augment import shear_x, shear_y

    yy, xx = np.mgrid[0:24, 0:32]
    array = np.stack([128 + 100 * np.sin(xx / 5.0), 128 + 100 * np.cos(yy / 4.0), 128 + 60 * np.sin((xx + yy) / 6.0)],
                     -1).astype(np.uint8)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    level, sign = torch.full((1,), 0.8), torch.ones(1)
    f = 0.8 * 0.3
    fill = dict(fillcolor=(128, 128, 128), resample=Image.BILINEAR)
    for op, pil, centre in [("ShearX", shear_x, (1, f, -f * 12, 0, 1, 0)), ("ShearY", shear_y, (1, 0, 0, f, 1, -f * 16))]:
        got = apply_op(x, op, level, sign)[0].permute(1, 2, 0).numpy() * 255
        want = np.asarray(pil(Image.fromarray(array), f, **fill), dtype=np.float64)
        about_centre = np.asarray(Image.fromarray(array).transform((32, 24), Image.AFFINE, centre, **fill), dtype=float)
        assert np.abs(got - want).mean() < 3 and np.abs(got - about_centre).mean() > 15, op


@pytest.mark.parametrize("device_data", [True, False])
def test_worker_data_shards_and_paths(device_data):
    cfg = DataConfig(dataset="mnist5k", img_size=32, batch_size=50, augment="none", device_data=device_data,
                     loader_workers=0, limit_train=400, limit_eval=101)
    ranks = [WorkerData(cfg, 0, torch.device("cpu"), rank, 2) for rank in range(2)]
    assert all(r.on_device == device_data and r.steps_per_epoch == 4 for r in ranks)
    epochs = [[list(r.train_batches(epoch)) for r in ranks] for epoch in (1, 2)]
    images, labels = epochs[0][0][0]
    assert len(epochs[0][0]) == 4 and images.shape == (50, 3, 32, 32) and labels.dtype == torch.int64
    def keys(batches):
        return [hash(x.numpy().tobytes()) for images, _ in batches for x in images]
    rank0, rank1 = keys(epochs[0][0]), keys(epochs[0][1])
    assert len(set(rank0) | set(rank1)) == 400  # an epoch: every image once, split between the ranks
    assert keys(epochs[1][0]) != rank0  # reshuffled per epoch
    evals = [torch.cat([labels for _, labels in r.eval_batches()]) for r in ranks]
    assert (len(evals[0]), len(evals[1])) == (51, 50)


def test_worker_data_needs_a_full_batch():
    cfg = DataConfig(dataset="mnist5k", batch_size=64, limit_train=100, loader_workers=0)
    with pytest.raises(UserError, match="no full batch of data.batch_size=64 per worker on 2 worker"):
        WorkerData(cfg, 0, torch.device("cpu"), 0, 2)


def test_per_image_rand_augment_survives_the_top_magnitude():
    """timm clips magnitudes at 10, where its PosterizeIncreasing asks Pillow for 0 bits (a ValueError); our
    transform caps them below 10."""
    transform = image_transform(RECIPES["vit"], 32, train=True)
    rand_augment_step = transform.transforms[2]
    for op in rand_augment_step.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 12, 0.0
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8))
    for _ in range(20):
        assert transform(image).shape == (3, 32, 32)
