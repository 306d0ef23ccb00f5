"""Bring your own dataset: `--dataset folder` on generated class folders (class count from the folders, statistics
computed once and cached, or given) and timm's dataset factory (`torch/image_folder`, `hfds/<name>`) on a local
tree, each trained for real through `uhkd.train`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uhkd.config import build_config
from uhkd.data import get_dataset, load_split
from uhkd.data.stats import cache_dir
from uhkd.errors import UserError
from uhkd.train import main, run_in_process

CLASSES = ("cat", "dog", "eel")
TINY_RUN = {"model.scale": "tiny", "data.img_size": 32, "data.batch_size": 8, "data.augment": "cnn",
            "data.loader_workers": 0, "optim.epochs": 1, "optim.max_steps_per_epoch": 2, "eval_teacher": False,
            "method.name": "scratch", "model.teacher": "", "model.student": "resnet18", "workers": 0}


def write_folders(root: Path, per_class: dict[str, int] | None = None, size: int = 20) -> Path:
    """train/ and val/ trees of PNGs, each class a distinct colour band (so the statistics are known)."""
    rng = np.random.default_rng(0)
    for part, n in (("train", 12), ("val", 4)):
        for c, name in enumerate(CLASSES):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range((per_class or {}).get(name, n)):
                image = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
                image[..., c] += 160
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _pixels(root: Path) -> np.ndarray:
    return np.concatenate([np.asarray(Image.open(p), dtype=np.float64).reshape(-1, 3) / 255
                           for p in sorted((root / "train").glob("*/*.png"))])


@pytest.mark.parametrize("dataset", ["folder", "torch/image_folder"])
def test_class_folders_give_classes_statistics_and_splits(tmp_path, dataset):
    root = write_folders(tmp_path / "data")
    info = get_dataset(dataset, str(root))
    assert info.num_classes == 3
    pixels = _pixels(root)
    assert info.mean == pytest.approx(pixels.mean(0), abs=1e-4) and info.std == pytest.approx(pixels.std(0), abs=1e-4)
    assert len(list(cache_dir().glob("*.json"))) == 1  # computed once, then read back
    assert get_dataset(dataset, str(root)).mean == info.mean
    given = get_dataset(dataset, str(root), mean="0.5", std="0.2,0.3,0.4")
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.2, 0.3, 0.4) and given.num_classes == 3

    train, test = load_split(dataset, str(root), "final")
    assert (len(train), len(test)) == (36, 12)
    image, label = test[11]
    assert image.mode == "RGB" and label == 2
    tune_train, tune_val = load_split(dataset, str(root), "tune", val_fraction=0.25)
    assert (len(tune_train), len(tune_val)) == (27, 9)  # the seeded 75/25 split of the 36 training images


@pytest.mark.parametrize("dataset, split", [("folder", "tune"), ("torch/image_folder", "final")])
def test_a_run_trains_on_own_folders(tmp_path, dataset, split):
    root = write_folders(tmp_path / "data")
    cfg = build_config("quick", {**TINY_RUN, "data.dataset": dataset, "data.root": str(root), "data.split": split,
                                 "output_dir": str(tmp_path / "run")})
    metrics = run_in_process(cfg)
    assert metrics["status"] == "ok" and 0 <= metrics["top1"] <= 100
    student = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert student["num_classes"] == 3  # from the folders
    assert student["mean"] == pytest.approx(list(get_dataset(dataset, str(root)).mean), abs=1e-6)


def test_hugging_face_datasets_through_timms_factory(tmp_path, monkeypatch):
    """`hfds/<name>`: timm's factory hands the name to `datasets.load_dataset`, here a local image-folder tree
    (offline, as on a cluster node with the data copied), cached under --data-root."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    root, cache = write_folders(tmp_path / "data"), tmp_path / "hf-cache"
    name = f"hfds/{root}"
    info = get_dataset(name, str(cache))
    assert info.num_classes == 3
    assert info.mean == pytest.approx(_pixels(root).mean(0), abs=1e-4)
    train, test = load_split(name, str(cache), "final")
    assert (len(train), len(test)) == (36, 12) and sorted({test[i][1] for i in range(12)}) == [0, 1, 2]
    assert any(cache.iterdir())  # datasets' cache went to --data-root
    cfg = build_config("quick", {**TINY_RUN, "data.dataset": name, "data.root": str(cache), "data.split": "tune",
                                 "output_dir": str(tmp_path / "run")})
    metrics = run_in_process(cfg)
    assert metrics["status"] == "ok"
    assert torch.load(tmp_path / "run" / "student.pt", weights_only=True)["num_classes"] == 3


def test_the_vit_recipe_on_folders(tmp_path):
    """A token student gets the ViT/MLP recipe (RandAugment, mixup/cutmix, erasing) through the per-image path."""
    root = write_folders(tmp_path / "data")
    cfg = build_config("quick", {**TINY_RUN, "model.student": "deit_tiny_patch16_224", "data.augment": "vit",
                                 "data.dataset": "folder", "data.root": str(root),
                                 "output_dir": str(tmp_path / "run")})
    assert run_in_process(cfg)["status"] == "ok"


def test_folder_problems_are_one_line(tmp_path, capsys):
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match=r"class-folder dataset not found at .*only_train.*val/<class>/<image>"):
        get_dataset("folder", str(tmp_path / "only_train"))
    with pytest.raises(UserError, match="dataset 'folder' needs --data-root DIR"):
        get_dataset("folder", "")
    with pytest.raises(UserError, match=r"data.std must be one or three comma-separated numbers > 0"):
        get_dataset("folder", str(write_folders(tmp_path / "ok")), std="0,1,1")
    with pytest.raises(UserError, match=r"dataset 'torch/nosuch' at .* does not open through timm's create_dataset"):
        get_dataset("torch/nosuch", str(tmp_path)).check(str(tmp_path), False)
    with pytest.raises(UserError, match=r"unknown dataset 'foldr' \(did you mean folder\?\); valid choices: "
                                         r".*folder.*torch/<name>"):
        get_dataset("foldr")
    assert main(["--dataset", "folder", "--data-root", str(tmp_path / "none"), "--workers", "0",
                 "--preset", "quick"]) == 2
    assert "class-folder dataset not found at" in capsys.readouterr().err


def test_a_folder_run_says_what_it_found(tmp_path, capsys):
    """Before training: the classes, the images of train/ and val/, the mean/std used and where they come from."""
    root = write_folders(tmp_path / "data", {"cat": 5})
    run = ["--dataset", "folder", "--data-root", str(root), "--preset", "quick", "--method", "scratch", "--teacher",
           "", "--student", "resnet18", "--workers", "0", "--epochs", "1", "--set", "optim.max_steps_per_epoch=1",
           "--set", "data.batch_size=8", "--set", "eval_teacher=false"]
    mean, std = _pixels(root).mean(0), _pixels(root).std(0)
    numbers = lambda values: ",".join(f"{v:.4g}" for v in np.round(values, 4))  # noqa: E731
    found = f"dataset folder: 3 classes at {root}, 29 images in train/ and 13 in val/"  # cat: 5 in each
    assert main([*run, "--output", str(tmp_path / "a")]) == 0
    printed = capsys.readouterr().out.splitlines()
    (line,) = [line for line in printed if line.startswith("dataset ")]
    (done,) = [line for line in printed if line.startswith("done: ")]
    assert "teacher" not in done  # scratch: no teacher, no teacher top-1
    assert line.startswith(f"{found}; mean {numbers(mean)} std {numbers(std)} (computed from 29 training images, "
                           f"cached in {cache_dir()}/")
    assert main([*run, "--output", str(tmp_path / "b")]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dataset ")]
    assert line.startswith(f"{found}; mean {numbers(mean)} std {numbers(std)} (cached in {cache_dir()}/")
    assert main([*run, "--output", str(tmp_path / "c"), "--set", "data.mean=0.5", "--set", "data.std=0.2,0.3,0.4"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("dataset ")]
    assert line == f"{found}; mean 0.5,0.5,0.5 std 0.2,0.3,0.4 (given by data.mean and data.std)"


def test_a_class_folder_mismatch_names_the_missing_classes(tmp_path, capsys):
    root = write_folders(tmp_path / "data")
    (root / "train" / "fox").mkdir()
    Image.new("RGB", (20, 20)).save(root / "train" / "fox" / "0.png")
    for image in (root / "val" / "eel").iterdir():
        image.unlink()
    (root / "val" / "eel").rmdir()
    (root / "val" / "emu").mkdir()
    Image.new("RGB", (20, 20)).save(root / "val" / "emu" / "0.png")
    message = (f"class-folder dataset at '{root}': train/ has 4 class folders and val/ 3; they must be the same "
               f"(labels follow the sorted folder names): 2 only in train/: eel, fox; 1 only in val/: emu")
    assert main(["--dataset", "folder", "--data-root", str(root), "--workers", "0", "--preset", "quick"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    with pytest.raises(UserError) as err:  # timm's factory reads only train/ to check: the split finds it
        load_split("torch/image_folder", str(root), "final")
    assert str(err.value).endswith("the training set has 4 class folders and the evaluation set 3; they must be "
                                   "the same (labels follow the sorted folder names): 2 only in the training set: "
                                   "eel, fox; 1 only in the evaluation set: emu")
