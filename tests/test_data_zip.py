"""EDM dataset zips (zip:PATH): the dataset_tool.py layout, labelled and unlabelled, greyscale and RGB, pixels equal
to the folder loader's, sorted order, ?size= and ?flip=, every refusal, and training on one from the CLI."""

import io
import json
import zipfile

import numpy as np
import torch
from PIL import Image

import difflab.data.zipped as zipped
from difflab.cli import main
from difflab.data import get_dataset
from difflab.data.images import ImageData, load_image_folder
from difflab.data.zipped import load_image_zip
from test_data_images import expect_error


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def edm_name(i: int) -> str:
    """The member name dataset_tool.py gives image i."""
    return f"{i // 1000:05d}/img{i:08d}.png"


def edm_zip(path, members: dict, labels="absent"):
    """A zip of ``members`` (name -> bytes or uint8 array), with dataset.json {"labels": labels} unless "absent"
    (labels may also be raw JSON text, written as it is). Stored uncompressed, as dataset_tool.py does."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data if isinstance(data, bytes) else png(data))
        if labels != "absent":
            zf.writestr("dataset.json", labels if isinstance(labels, str) else json.dumps({"labels": labels}))
    return path


def extract(members: dict, folder):
    """The same images as a folder, for the folder loader."""
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(data))
    return folder


def random_images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(n)]


# --------------------------------------------------------------------------------------------- loading


def test_labelled_rgb_zip_matches_the_folder_loader(tmp_path):
    idx = [1000, 2, 999, 0, 1001]  # written out of order, across two subfolders
    images = dict(zip(map(edm_name, idx), random_images(5, (4, 6, 3)), strict=True))
    label_of = {1000: 3, 2: 0, 999: 1, 0: 1, 1001: 2}
    z = edm_zip(tmp_path / "cifar-like.zip", images, [[edm_name(i), label_of[i]] for i in idx])
    ds = load_image_zip(z)
    order = sorted(idx)
    assert isinstance(ds, ImageData) and ds.images.shape == (5, 3, 4, 6) and ds.name == "cifar-like"
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [label_of[i] for i in order]
    assert ds.num_classes == 4 and ds.class_names == ("0", "1", "2", "3") and not ds.flip
    want = np.stack([images[edm_name(i)].transpose(2, 0, 1) for i in order]) / 127.5 - 1
    np.testing.assert_array_equal(ds.images.numpy(), want)
    folder = load_image_folder(extract(images, tmp_path / "extracted"))
    assert torch.equal(ds.images, folder.images)
    same = get_dataset(f"zip:{z}")
    assert torch.equal(same.images, ds.images) and torch.equal(same.labels, ds.labels)


def test_unlabelled_greyscale_and_mixed_zips(tmp_path):
    grey = dict(zip(map(edm_name, range(3)), random_images(3, (5, 5), seed=1), strict=True))
    for labels in ("absent", None):
        ds = load_image_zip(edm_zip(tmp_path / f"grey-{labels}.zip", grey, labels))
        assert ds.images.shape == (3, 1, 5, 5) and ds.labels is None and ds.num_classes == 0 and ds.class_names == ()
        assert torch.equal(ds.images, load_image_folder(extract(grey, tmp_path / "g")).images)
    mixed = {**grey, edm_name(3): random_images(1, (5, 5, 3), seed=2)[0]}  # one RGB image: all become RGB
    ds = load_image_zip(edm_zip(tmp_path / "mixed.zip", mixed, None))
    assert ds.images.shape == (4, 3, 5, 5)
    assert torch.equal(ds.images, load_image_folder(extract(mixed, tmp_path / "m")).images)
    np.testing.assert_array_equal(ds.images[0].numpy(), np.stack([grey[edm_name(0)]] * 3) / 127.5 - 1)


def test_size_and_flip_options(tmp_path):
    images = {"a/wide.png": np.tile(np.arange(6, dtype=np.uint8) * 40, (4, 1)), "b/tall.png": np.full((9, 5), 100)}
    z = edm_zip(tmp_path / "sizes.zip", images)
    ds = get_dataset(f"zip:{z}?size=4")
    assert ds.images.shape == (2, 1, 4, 4) and not ds.flip
    assert torch.equal(ds.images, load_image_folder(extract(images, tmp_path / "x"), size=4).images)
    np.testing.assert_array_equal(ds.images[0, 0].numpy(), np.tile(images["a/wide.png"][0, 1:5], (4, 1)) / 127.5 - 1)
    flipped = get_dataset(f"zip:{z}?size=4&flip=1")
    assert flipped.flip and torch.equal(flipped.images, ds.images)
    j = np.random.default_rng(3).integers(0, 4, 200)  # the documented draws: row j % N, flipped when j >= N
    src, mirror = ds.images[j % 2], torch.from_numpy(j >= 2)
    x = flipped.sample(200, seed=3)
    assert torch.equal(x[mirror], src[mirror].flip(-1)) and torch.equal(x[~mirror], src[~mirror])
    assert load_image_zip(z, size=2, flip=True).flip


def test_odd_member_names_are_read_never_written(tmp_path):
    a, b, c = random_images(3, (2, 2), seed=4)
    members = {"../evil.png": a, "/abs/x.png": b, "00000\\img00000002.png": c,  # Windows separators
               "__MACOSX/00000/._img00000002.png": b"\0\5 apple double", ".hidden/y.png": b"junk", "notes.txt": b"hi"}
    labels = [["../evil.png", 1], ["/abs/x.png", 0], ["00000/img00000002.png", 2]]
    z = edm_zip(tmp_path / "odd.zip", members, labels)
    assert {"../evil.png", "/abs/x.png"} <= set(zipfile.ZipFile(z).namelist())
    ds = load_image_zip(z)
    assert ds.images.shape == (3, 1, 2, 2) and ds.labels.tolist() == [1, 0, 2]  # sorted: "../", "/abs", "0000"
    np.testing.assert_array_equal(ds.images.numpy(), np.stack([a, b, c])[:, None] / 127.5 - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.zip"] and not (tmp_path.parent / "evil.png").exists()


# --------------------------------------------------------------------------------------------- refusals


def test_file_and_zip_errors(tmp_path):
    expect_error(["no such folder or file", "missing.zip", "dataset_tool.py"], load_image_zip, tmp_path / "missing.zip")
    expect_error(["is a folder, not a zip", "folder:PATH"], load_image_zip, tmp_path)
    (tmp_path / "fake.zip").write_bytes(b"hello, not a zip")
    expect_error(["fake.zip is not a readable zip file", "File is not a zip file"], load_image_zip,
                 tmp_path / "fake.zip")
    z = edm_zip(tmp_path / "empty.zip", {"readme.txt": b"hi"}, None)
    expect_error(["no images found in", "empty.zip", ".png", "'readme.txt'", "dataset_tool.py"], load_image_zip, z)
    expect_error(["no images found", "no other files"], load_image_zip, edm_zip(tmp_path / "none.zip", {}))
    z = edm_zip(tmp_path / "mixed.zip", {"a.png": np.zeros((3, 4)), "b.png": np.zeros((3, 5))})
    expect_error(["differ in size", "a.png is 4x3", "b.png is 5x3", f"zip:{z}?size=32"], load_image_zip, z)
    assert load_image_zip(z, size=3).images.shape == (2, 1, 3, 3)
    expect_error("image size must be an integer", load_image_zip, z, size=0)
    expect_error("flip must be True or False", load_image_zip, z, flip="yes")


def test_corrupt_members(tmp_path):
    good = {edm_name(0): np.zeros((8, 8, 3))}
    z = edm_zip(tmp_path / "junk.zip", {**good, edm_name(1): b"not a png at all"})
    expect_error(["cannot read image", "junk.zip:00000/img00000001.png", "cannot identify image file "
                  "'00000/img00000001.png'", "corrupt"], load_image_zip, z)
    whole = png(np.random.default_rng(0).integers(0, 256, (64, 64, 3)))
    z = edm_zip(tmp_path / "cut.zip", {**good, edm_name(1): whole[: len(whole) // 2]})  # header intact
    expect_error(["cannot read image", "cut.zip:00000/img00000001.png", "corrupt"], load_image_zip, z, size=4)
    z = edm_zip(tmp_path / "crc.zip", {**good, edm_name(1): whole})
    raw = bytearray(z.read_bytes())
    at = raw.find(whole) + len(whole) // 2
    raw[at] ^= 0xFF  # one flipped byte inside the stored PNG: the zip's CRC catches it
    z.write_bytes(bytes(raw))
    expect_error(["cannot read image", "crc.zip:00000/img00000001.png", "Bad CRC-32"], load_image_zip, z)


def test_zip_bombs_are_refused_before_reading(tmp_path, monkeypatch):
    z = edm_zip(tmp_path / "bomb.zip", {edm_name(0): np.zeros((2, 2)), edm_name(1): np.zeros((2, 2))})
    raw = bytearray(z.read_bytes())
    central = raw.find(b"PK\x01\x02", raw.find(b"PK\x01\x02") + 4)  # the second member's central record
    raw[central + 24: central + 28] = (2 ** 32 - 2).to_bytes(4, "little")  # declared uncompressed size: ~4 GiB
    z.write_bytes(bytes(raw))
    assert zipfile.ZipFile(z).infolist()[1].file_size == 2 ** 32 - 2
    expect_error(["bomb.zip:00000/img00000001.png declares 4294967294 bytes", "64 MiB limit", "zip bomb"],
                 load_image_zip, z)
    monkeypatch.setattr(zipped, "MAX_TOTAL", 100)
    z = edm_zip(tmp_path / "many.zip", {edm_name(i): np.zeros((2, 2)) for i in range(3)})
    expect_error(["many.zip: its 3 images declare", "zip bomb"], load_image_zip, z)
    monkeypatch.setattr(zipped, "MAX_JSON", 10)
    z = edm_zip(tmp_path / "json.zip", {edm_name(0): np.zeros((2, 2))}, [[edm_name(0), 0]])
    expect_error(["json.zip:dataset.json declares", "zip bomb"], load_image_zip, z)


def test_dataset_json_errors(tmp_path):
    images = {edm_name(0): np.zeros((2, 2)), edm_name(1): np.full((2, 2), 9)}
    a, b = edm_name(0), edm_name(1)

    def bad(labels, fragments):
        return expect_error(["bad.zip:dataset.json", *fragments], load_image_zip,
                            edm_zip(tmp_path / "bad.zip", images, labels))

    bad('{"labels": [[', ["is not valid JSON", '{"labels": null}'])
    bad("[1, 2]", ["is not an object with a 'labels' key"])
    bad('{"label": null}', ["is not an object with a 'labels' key"])
    bad(5, ["'labels' is a int, not a list of [name, label] pairs"])
    bad([[a, 0], [b]], ['labels entry ["00000/img00000001.png"] is not a [name, label] pair'])
    bad([[a, 0], [3, 1]], ["labels entry [3, 1] is not a [name, label] pair"])
    bad([[a, 0], [b, 1.5]], ["label 1.5 of '00000/img00000001.png' is not an integer", "0..K-1"])
    bad([[a, 0], [b, "cat"]], ['label "cat" of', "is not an integer"])
    bad([[a, 0], [b, True]], ["label true of", "is not an integer"])
    bad([[a, [0.1, 0.9]], [b, 1]], ["label [0.1, 0.9] of", "label vectors are not supported"])
    bad([[a, 0], [b, -1]], ["label -1 of '00000/img00000001.png' is out of range", "0..K-1"])
    bad([[a, 0], [b, 10 ** 30]], ["is out of range"])
    bad([[a, 0], [a, 1], [b, 1]], ["labels '00000/img00000000.png' twice", "one label per image"])
    bad([[a, 0]], ["1 of 2 images have no label (first: '00000/img00000001.png')", '"labels": null'])
    bad([[a, 0], [b, 1], ["00000/img00000007.png", 1]], ["labels files that are not images in the zip (1, first: "
                                                        "'00000/img00000007.png')"])
    ds = load_image_zip(edm_zip(tmp_path / "good.zip", images, json.dumps({"labels": {a: 1, b: 0}})))
    assert ds.labels.tolist() == [1, 0]  # a name -> label object is read as EDM's dict(labels) reads it


def test_get_dataset_specs(tmp_path):
    z = edm_zip(tmp_path / "set.zip", {edm_name(0): np.zeros((2, 2))}, None)
    expect_error(["looks like an EDM dataset zip", f"give it as zip:{z}"], get_dataset, str(z))
    expect_error(f"give it as zip:{z}?size=4", get_dataset, f"{z}?size=4")
    expect_error(["unknown option 'flp'", "did you mean 'flip'", "takes size, flip"], get_dataset, f"zip:{z}?flp=1")
    expect_error("did you mean 'zip:'", get_dataset, f"zipp:{z}")
    expect_error("names no path", get_dataset, "zip:")
    expect_error("no such folder or file", get_dataset, f"zip:{tmp_path / 'nothing.zip'}")
    assert "zip:PATH (EDM dataset zips)" in expect_error("unknown data set", get_dataset, "digitz")


# --------------------------------------------------------------------------------------------- CLI


def test_train_on_a_zip_from_the_cli(tmp_path, capsys):
    images = dict(zip(map(edm_name, range(12)), random_images(12, (8, 8), seed=5), strict=True))
    z = edm_zip(tmp_path / "tiny.zip", images, [[name, i % 3] for i, name in enumerate(images)])
    out = tmp_path / "run"
    code = main(["train", "--data", f"zip:{z}?flip=1", "--arch", "unet", "--preset", "tiny", "--steps", "2",
                 "--batch-size", "8", "--out", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["data"]["name"] == f"zip:{z}?flip=1"
