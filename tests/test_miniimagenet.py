"""mini-ImageNet reader: the three layouts agree, resize correctly, and every bad input is a FedmetaError."""

from __future__ import annotations

import builtins
import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmeta.data.miniimagenet import load_miniimagenet
from fedmeta.errors import FedmetaError

# Insertion order deliberately differs from sorted order, to check the wnid sort.
WNIDS = {
    "train": ["n03000000", "n01000000", "n02000000"],
    "val": ["n05000000", "n04000000"],
    "test": ["n07000000", "n06000000"],
}
PER_CLASS = 4
Arrays = dict[str, dict[str, list[np.ndarray]]]


def random_arrays(seed: int = 0, size: tuple[int, int] | None = (84, 84)) -> Arrays:
    """Random-noise images per split and class; size=None gives varying sizes."""
    rng = np.random.default_rng(seed)
    out: Arrays = {}
    for split, wnids in WNIDS.items():
        out[split] = {}
        for wnid in wnids:
            imgs = []
            for _ in range(PER_CLASS):
                h, w = size or (int(rng.integers(60, 130)), int(rng.integers(60, 130)))
                imgs.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            out[split][wnid] = imgs
    return out


def solid_arrays(seed: int = 1) -> Arrays:
    """One random solid colour per image, at varying sizes (e.g. 100x90): survives JPEG almost exactly."""
    rng = np.random.default_rng(seed)
    sizes = [(90, 100), (84, 84), (120, 70), (64, 96)]
    return {
        split: {
            wnid: [np.full((*sizes[i], 3), rng.integers(0, 256, 3), dtype=np.uint8) for i in range(PER_CLASS)]
            for wnid in wnids
        }
        for split, wnids in WNIDS.items()
    }


def write_csv_layout(root: Path, arrays: Arrays, ext: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    for split, classes in arrays.items():
        with (root / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", "label"])
            for wnid, imgs in classes.items():
                for i, arr in enumerate(imgs):
                    name = f"{wnid}{i:08d}{ext}"
                    Image.fromarray(arr).save(root / "images" / name)
                    w.writerow([name, wnid])
    return root


def write_folder_layout(root: Path, arrays: Arrays, ext: str = ".png") -> Path:
    for split, classes in arrays.items():
        for wnid, imgs in classes.items():
            (root / split / wnid).mkdir(parents=True)
            for i, arr in enumerate(imgs):
                Image.fromarray(arr).save(root / split / wnid / f"{i:02d}{ext}")
    return root


def write_pickle_layout(root: Path, arrays: Arrays, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, classes in arrays.items():
        data, class_dict = [], {}
        for wnid, imgs in classes.items():
            class_dict[wnid] = list(range(len(data), len(data) + len(imgs)))
            data += imgs
        cache = {"image_data": np.stack(data), "class_dict": class_dict}
        (root / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(cache, protocol=protocol))
    return root


def in_loader_order(arrays: Arrays) -> list[tuple[int, np.ndarray]]:
    """(label, array) pairs in the order the loader must emit them: splits in order, wnids sorted."""
    names = [w for split in ("train", "val", "test") for w in sorted(arrays[split])]
    return [
        (names.index(w), arr)
        for split in ("train", "val", "test")
        for w in sorted(arrays[split])
        for arr in arrays[split][w]
    ]


def expected_images(arrays: Arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(arr).permute(2, 0, 1) for _, arr in in_loader_order(arrays)])


def expected_labels(arrays: Arrays) -> torch.Tensor:
    return torch.tensor([label for label, _ in in_loader_order(arrays)])


SORTED_WNIDS = ["n01000000", "n02000000", "n03000000", "n04000000", "n05000000", "n06000000", "n07000000"]
FIXED_SPLIT = {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6]}


def assert_same(a, b) -> None:
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels)
    assert a.class_names == b.class_names
    assert torch.equal(a.groups, b.groups)
    assert a.fixed_split == b.fixed_split


# --- well-formed layouts -----------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickle_layout_reads_exact_pixels_and_labels(tmp_path, protocol):
    arrays = random_arrays()
    ds = load_miniimagenet(write_pickle_layout(tmp_path, arrays, protocol))
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7 * PER_CLASS, 3, 84, 84)
    assert ds.labels.dtype == torch.int64
    assert torch.equal(ds.images, expected_images(arrays))
    assert torch.equal(ds.labels, expected_labels(arrays))
    assert ds.class_names == SORTED_WNIDS
    assert ds.fixed_split == FIXED_SPLIT
    assert torch.equal(ds.groups, torch.arange(7))


def test_pickle_written_with_numpy1_global_names_loads(tmp_path):
    """Real caches predate numpy 2 and name numpy.core.multiarray; protocol 2 spells globals as text."""
    arrays = random_arrays()
    write_pickle_layout(tmp_path, arrays, protocol=2)
    for p in tmp_path.glob("*.pkl"):
        raw = p.read_bytes()
        assert b"numpy._core.multiarray" in raw
        p.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(load_miniimagenet(tmp_path).images, expected_images(arrays))


@pytest.mark.parametrize("writer", [write_csv_layout, write_folder_layout])
def test_lossless_layouts_match_pickle(tmp_path, writer):
    arrays = random_arrays()
    from_pickle = load_miniimagenet(write_pickle_layout(tmp_path / "pkl", arrays))
    assert_same(load_miniimagenet(writer(tmp_path / "files", arrays)), from_pickle)


@pytest.mark.parametrize("writer", [write_csv_layout, write_folder_layout])
@pytest.mark.parametrize("image_size", [84, 32])
def test_jpegs_of_any_size_are_resized_in_order(tmp_path, writer, image_size):
    arrays = solid_arrays()
    ds = load_miniimagenet(writer(tmp_path, arrays, ".jpg"), image_size=image_size)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (7 * PER_CLASS, 3, image_size, image_size)
    assert torch.equal(ds.labels, expected_labels(arrays))
    assert ds.class_names == SORTED_WNIDS and ds.fixed_split == FIXED_SPLIT
    colours = [arr[0, 0] for _, arr in in_loader_order(arrays)]
    got = ds.images.float().mean(dim=(2, 3))
    assert torch.allclose(got, torch.tensor(np.stack(colours), dtype=torch.float32), atol=6)


def test_pickle_layout_resizes(tmp_path):
    ds = load_miniimagenet(write_pickle_layout(tmp_path, random_arrays()), image_size=21)
    assert ds.images.shape == (7 * PER_CLASS, 3, 21, 21) and ds.images.dtype == torch.uint8


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    arrays = solid_arrays()
    write_folder_layout(tmp_path, arrays, ".png")
    some = tmp_path / "train" / "n01000000"
    Image.new("L", (50, 70), 200).save(some / "00.png")
    Image.new("RGBA", (70, 50), (10, 20, 30, 128)).save(some / "01.png")
    ds = load_miniimagenet(tmp_path)
    assert ds.images.shape[1] == 3
    assert ds.images[0].float().mean(dim=(1, 2)).tolist() == [200.0, 200.0, 200.0]
    assert ds.images[1].float().mean(dim=(1, 2)).tolist() == [10.0, 20.0, 30.0]


def test_hidden_and_non_image_files_in_class_folders_are_ignored(tmp_path):
    arrays = random_arrays()
    write_folder_layout(tmp_path, arrays)
    (tmp_path / "train" / "n01000000" / "._00.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "train" / "n01000000" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"junk")
    assert torch.equal(load_miniimagenet(tmp_path).images, expected_images(arrays))


# --- bad inputs --------------------------------------------------------------


def error(root: Path, **kwargs) -> str:
    with pytest.raises(FedmetaError) as info:
        load_miniimagenet(root, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_root(tmp_path):
    assert str(tmp_path / "nope") in error(tmp_path / "nope")


@pytest.mark.parametrize(
    "partial", [[], ["train.csv", "val.csv", "test.csv"], ["images/", "train.csv"], ["train/", "val/"]]
)
def test_unknown_or_incomplete_layout_lists_accepted_layouts(tmp_path, partial):
    for name in partial:
        (tmp_path / name).mkdir() if name.endswith("/") else (tmp_path / name).write_text("filename,label\n")
    msg = error(tmp_path)
    assert (
        str(tmp_path) in msg and "train.csv" in msg and "mini-imagenet-cache" in msg and "one folder per class" in msg
    )


def test_csv_naming_missing_image(tmp_path):
    write_csv_layout(tmp_path, random_arrays())
    (tmp_path / "images" / "n0500000000000001.png").unlink()  # third line of val.csv
    msg = error(tmp_path)
    assert f"{tmp_path / 'val.csv'}: line 3 names missing image {tmp_path / 'images' / 'n0500000000000001.png'}" == msg


@pytest.mark.parametrize("header", ["file,label", "label,filename", ""])
def test_csv_with_bad_header(tmp_path, header):
    write_csv_layout(tmp_path, random_arrays())
    lines = (tmp_path / "test.csv").read_text().splitlines()
    (tmp_path / "test.csv").write_text("\n".join([header, *lines[1:]]) if header else "")
    msg = error(tmp_path)
    assert str(tmp_path / "test.csv") in msg and "filename,label" in msg


def test_csv_row_with_wrong_field_count(tmp_path):
    write_csv_layout(tmp_path, random_arrays())
    with (tmp_path / "train.csv").open("a") as f:
        f.write("onlyonefield\n")
    assert f"{tmp_path / 'train.csv'}: line 14" in error(tmp_path)


@pytest.mark.parametrize("writer", [write_csv_layout, write_folder_layout])
@pytest.mark.parametrize("payload", [b"this is not a jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00truncated"])
def test_corrupt_image(tmp_path, writer, payload):
    writer(tmp_path, random_arrays(), ".jpg")
    victim = (
        next((tmp_path / "images").glob("*.jpg"))
        if writer is write_csv_layout
        else tmp_path / "test" / "n06000000" / "02.jpg"
    )
    victim.write_bytes(payload)
    msg = error(tmp_path)
    assert msg.startswith(f"{victim}: unreadable image")


def test_empty_class_folder(tmp_path):
    write_folder_layout(tmp_path, random_arrays())
    (tmp_path / "val" / "n09000000").mkdir()
    assert str(tmp_path / "val" / "n09000000") in error(tmp_path)


def test_empty_split(tmp_path):
    write_csv_layout(tmp_path, random_arrays())
    (tmp_path / "val.csv").write_text("filename,label\n")
    msg = error(tmp_path)
    assert str(tmp_path / "val.csv") in msg and "no classes" in msg


def test_class_in_two_splits(tmp_path):
    arrays = random_arrays()
    arrays["test"]["n01000000"] = arrays["test"].pop("n06000000")
    write_folder_layout(tmp_path, arrays)
    msg = error(tmp_path)
    assert str(tmp_path / "test") in msg and "n01000000" in msg and "train" in msg


@pytest.mark.parametrize("image_size", [0, -3, 8.5, True])
def test_bad_image_size(tmp_path, image_size):
    write_pickle_layout(tmp_path, random_arrays())
    assert "image_size" in error(tmp_path, image_size=image_size)


class _SystemMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _OpenMarker(_SystemMarker):
    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.parametrize("evil", [_SystemMarker, _OpenMarker])
@pytest.mark.parametrize("where", ["top", "image_data", "class_list"])
def test_malicious_pickle_is_refused_without_running(tmp_path, evil, where):
    write_pickle_layout(tmp_path, random_arrays())
    marker = tmp_path / "pwned"
    payload = evil(marker)
    cache = {"image_data": np.zeros((4, 84, 84, 3), np.uint8), "class_dict": {"n01000000": [0, 1, 2, 3]}}
    if where == "top":
        cache = payload
    elif where == "image_data":
        cache["image_data"] = payload
    else:
        cache["class_dict"]["n01000000"] = [0, payload]
    victim = tmp_path / "mini-imagenet-cache-val.pkl"
    victim.write_bytes(pickle.dumps(cache))
    msg = error(tmp_path)
    assert msg.startswith("refusing to unpickle ") and msg.endswith(f" from {victim}")
    assert ("system" in msg) if evil is _SystemMarker else ("open" in msg)
    assert not marker.exists()


def test_codecs_encode_only_allowed_for_latin1(tmp_path):
    write_pickle_layout(tmp_path, random_arrays())
    victim = tmp_path / "mini-imagenet-cache-test.pkl"
    raw = pickle.dumps({"image_data": b"x", "class_dict": {}}, protocol=2)
    assert b"latin1" in raw
    victim.write_bytes(raw.replace(b"latin1", b"rot_13"))
    assert str(victim) in error(tmp_path)


@pytest.mark.parametrize(
    ("cache", "expect"),
    [
        ({"class_dict": {"n01000000": [0]}}, "'image_data' and 'class_dict'"),
        ({"image_data": np.zeros((1, 84, 84, 3), np.uint8)}, "'image_data' and 'class_dict'"),
        ([1, 2, 3], "'image_data' and 'class_dict'"),
        (
            {"image_data": np.zeros((1, 84, 84, 3), np.float32), "class_dict": {"n01000000": [0]}},
            "uint8 array [n, H, W, 3]",
        ),
        ({"image_data": np.zeros((1, 84, 84), np.uint8), "class_dict": {"n01000000": [0]}}, "uint8 array [n, H, W, 3]"),
        ({"image_data": [[0]], "class_dict": {"n01000000": [0]}}, "uint8 array [n, H, W, 3]"),
        ({"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": [0]}, "class_dict must be a dict"),
        (
            {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n01000000": [1]}},
            "indices into image_data",
        ),
        (
            {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n01000000": []}},
            "indices into image_data",
        ),
        (
            {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": {"n01000000": [0.0]}},
            "indices into image_data",
        ),
    ],
)
def test_malformed_pickle_contents(tmp_path, cache, expect):
    write_pickle_layout(tmp_path, random_arrays())
    victim = tmp_path / "mini-imagenet-cache-train.pkl"
    victim.write_bytes(pickle.dumps(cache))
    msg = error(tmp_path)
    assert msg.startswith(f"{victim}: ") and expect in msg


def test_pickle_that_is_not_a_pickle(tmp_path):
    write_pickle_layout(tmp_path, random_arrays())
    victim = tmp_path / "mini-imagenet-cache-test.pkl"
    victim.write_bytes(b"\x80\x05garbage")
    assert error(tmp_path).startswith(f"{victim}: not a readable pickle")
