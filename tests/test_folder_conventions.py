"""EveryDream2's data conventions, on real folders: global.yaml (a folder and its subfolders) and local.yaml (the
folder only), the one-value files (multiply.txt, flip_p.txt, cond_dropout.txt, loss_scale.txt, batch_id.txt,
shuffle_tags.txt), an image's own yaml keys; what they do to the epoch schedule, the rows and the latent cache;
bad values refused naming the file; the report lines. And the schedule of data without them, pinned draw for
draw to what it was before they existed."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import data.scan
from convert.tokenizer import clip_tokenizer
from data.buckets import Bucket
from data.dataset import TrainDataset, latent_keys
from data.errors import DataError
from data.options import DataOptions
from data.scan import ImageItem, scan_data_root
from data.schedule import batches_per_bucket, batches_per_epoch, epoch_batches, epoch_items
from tests.conftest import REPO_ROOT

SQUARE, WIDE = (64, 64), (128, 64)


def images(folder: Path, *names: str, size: tuple[int, int] = SQUARE) -> list[Path]:
    """Small real PNGs (a different gray each) with a .txt caption "<name>, tag a, tag b, tag c"."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        Image.new("RGB", size, (len(name) * 20 % 256,) * 3).save(path)
        path.with_suffix(".txt").write_text(f"{name}, tag a, tag b, tag c", encoding="utf-8")
        paths.append(path)
    return paths


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def by_name(scan) -> dict[str, ImageItem]:
    return {item.path.stem: item for item in scan.items}


def options(root: Path, **overrides) -> DataOptions:
    values = dict(data_root=root, resolution=64, batch_size=2, flip_p=0.5, seed=1, cond_dropout=0.0,
                  shuffle_tags=False, keep_tags=0, num_workers=0, cache_latents=False, validation_split=0.0,
                  validation_data_root=None)
    return DataOptions(**{**values, **overrides})


# ---------------------------------------------------------------- where settings come from


def test_global_reaches_subfolders_local_does_not_and_the_nearer_file_wins(tmp_path: Path):
    images(tmp_path, "top")
    write(tmp_path / "global.yaml", "flip_p: 0.25\nloss_scale: 2\n")
    images(tmp_path / "sub", "mid", "own")
    write(tmp_path / "sub" / "local.yaml", "flip_p: 1\ncond_dropout: 0.3\n")
    write(tmp_path / "sub" / "own.yaml", "main_prompt: own\nflip_p: 0\n")  # the image's own file wins
    images(tmp_path / "sub" / "deeper", "low")
    write(tmp_path / "sub" / "deeper" / "global.yaml", "loss_scale: 0.5\n")  # a child's global over its parent's
    images(tmp_path / "sub" / "deeper" / "deepest", "bottom")
    items = by_name(scan_data_root(tmp_path, 64))

    assert (items["top"].flip_p, items["top"].loss_scale, items["top"].cond_dropout) == (0.25, 2.0, None)
    assert (items["mid"].flip_p, items["mid"].cond_dropout, items["mid"].loss_scale) == (1.0, 0.3, 2.0)
    assert (items["own"].flip_p, items["own"].cond_dropout) == (0.0, 0.3)
    assert items["own"].caption == "own, tag a, tag b, tag c"  # a .txt still captions; the yaml gives settings
    assert (items["low"].flip_p, items["low"].cond_dropout, items["low"].loss_scale) == (0.25, None, 0.5)
    assert (items["bottom"].flip_p, items["bottom"].loss_scale) == (0.25, 0.5)
    assert {item.multiply for item in items.values()} == {1.0}


def test_global_yaml_of_a_folder_without_images_reaches_its_subfolders(tmp_path: Path):
    write(tmp_path / "global.yml", "batch_id: everything\nmultiply: 2\n")  # .yml as well as .yaml
    images(tmp_path / "a", "one")
    images(tmp_path / "a" / "b", "two")
    items = by_name(scan_data_root(tmp_path, 64))
    assert [(i.batch_id, i.multiply) for i in items.values()] == [("everything", 2.0)] * 2


def test_in_one_folder_everydream2s_order_decides(tmp_path: Path):
    """local.yaml beats flip_p/cond_dropout/multiply.txt; batch_id.txt and loss_scale.txt beat local.yaml; both
    beat global.yaml of the same folder."""
    images(tmp_path, "img")
    write(tmp_path / "global.yaml", "flip_p: 0.9\nloss_scale: 9\nmultiply: 9\nbatch_id: global\n")
    write(tmp_path / "local.yaml", "flip_p: 0.7\nloss_scale: 4\nmultiply: 3\nbatch_id: local\ncond_dropout: 0.2\n")
    write(tmp_path / "flip_p.txt", "0.3")
    write(tmp_path / "cond_dropout.txt", "0.1")
    write(tmp_path / "multiply.txt", "5")
    write(tmp_path / "loss_scale.txt", "3")
    write(tmp_path / "batch_id.txt", "from_txt")
    item = scan_data_root(tmp_path, 64).items[0]
    assert (item.flip_p, item.cond_dropout, item.multiply) == (0.7, 0.2, 3.0)
    assert (item.loss_scale, item.batch_id) == (3.0, "from_txt")


def test_each_one_value_file_applies_to_its_folder_only(tmp_path: Path):
    images(tmp_path, "here")
    write(tmp_path / "flip_p.txt", "\ufeff0.75\r\n")  # a BOM and CRLF, as Notepad writes
    write(tmp_path / "cond_dropout.txt", "1")
    write(tmp_path / "loss_scale.txt", "0.5")
    write(tmp_path / "batch_id.txt", "  my_horses \n")
    write(tmp_path / "multiply.txt", "3")
    write(tmp_path / "shuffle_tags.txt", "")  # its presence turns shuffling on
    images(tmp_path / "sub", "below")
    items = by_name(scan_data_root(tmp_path, 64))
    here, below = items["here"], items["below"]
    assert (here.flip_p, here.cond_dropout, here.loss_scale) == (0.75, 1.0, 0.5)
    assert (here.batch_id, here.multiply, here.shuffle_tags) == ("my_horses", 3.0, True)
    assert (below.flip_p, below.cond_dropout, below.loss_scale, below.batch_id, below.multiply,
            below.shuffle_tags) == (None, None, None, None, 1.0, None)


def test_an_images_own_yaml_or_json_sets_every_key(tmp_path: Path):
    images(tmp_path, "plain")
    (tmp_path / "captioned.png").write_bytes((tmp_path / "plain.png").read_bytes())
    write(tmp_path / "captioned.yaml", "main_prompt: a horse\ntags: [brown]\nflip_p: 0\ncond_dropout: 0.5\n"
          "loss_scale: 1.5\nbatch_id: 7\nmultiply: 0\nshuffle_tags: true\n")
    write(tmp_path / "captioned.json", '{"flip_p": 1, "loss_scale": 3}')  # .yaml wins each key both set
    images(tmp_path, "jsoned")
    write(tmp_path / "jsoned.json", '{"flip_p": 0.125}')
    items = by_name(scan_data_root(tmp_path, 64))
    own = items["captioned"]
    assert own.caption == "a horse, brown"
    assert (own.flip_p, own.cond_dropout, own.loss_scale) == (0.0, 0.5, 1.5)
    assert (own.batch_id, own.multiply, own.shuffle_tags) == ("7", 0.0, True)
    assert items["jsoned"].flip_p == 0.125 and items["plain"].flip_p is None


# ---------------------------------------------------------------- what they do


def test_batch_ids_never_share_a_batch(tmp_path: Path):
    images(tmp_path / "horses", "h1", "h2", "h3")
    write(tmp_path / "horses" / "batch_id.txt", "horses")
    images(tmp_path / "cats", "c1", "c2", "c3")
    write(tmp_path / "cats" / "local.yaml", "batch_id: cats\n")
    images(tmp_path / "rest", "r1", "r2", "r3", "r4")
    images(tmp_path / "rest", "w1", size=WIDE)
    write(tmp_path / "rest" / "w1.yaml", "batch_id: cats\n")  # a group spans folders; buckets still split it
    items = scan_data_root(tmp_path, 128).items
    # 128x128: horses 3 (2 batches), cats 3 (2), unnamed 4 (2); 192x64: cats 1 (1)
    assert batches_per_epoch(items, 2) == 7
    assert batches_per_bucket(items, 2) == {Bucket(128, 128): 6, Bucket(192, 64): 1}
    assert {str(b): len(rows) for b, rows in epoch_items(items, 1, 0).items()} == {"128x128": 10, "192x64": 1}
    for epoch in range(4):
        batches = epoch_batches(items, 2, 0.5, seed=3, epoch=epoch)
        assert len(batches) == 7
        for batch in batches:  # fillers (weight 0) come from the batch's own group too
            assert len({(items[d.index].batch_id, items[d.index].bucket) for d in batch}) == 1, batch
        real = Counter(d.index for batch in batches for d in batch if d.weight)
        assert real == Counter(range(len(items)))


def test_an_images_own_flip_p_decides_its_flips(tmp_path: Path):
    images(tmp_path / "always", "a1", "a2", "a3")
    write(tmp_path / "always" / "flip_p.txt", "1")
    images(tmp_path / "never", "n1", "n2", "n3")
    write(tmp_path / "never" / "local.yaml", "flip_p: 0.0\n")
    images(tmp_path / "run", *(f"r{i}" for i in range(6)))
    items = scan_data_root(tmp_path, 64).items
    flips: dict[str, set[bool]] = {}
    for epoch in range(5):
        for batch in epoch_batches(items, 2, flip_p=0.5, seed=11, epoch=epoch):
            for draw in batch:
                flips.setdefault(items[draw.index].path.parent.name, set()).add(draw.flip)
    assert flips == {"always": {True}, "never": {False}, "run": {False, True}}
    # the latent cache encodes a flipped variant exactly for the images that can be flipped
    folders = [item.path.parent.name for item in items]
    for run_flip_p, flippable in ((0.0, {"always"}), (0.5, {"always", "run"})):
        keys = latent_keys(items, run_flip_p)
        assert {folders[i] for i, flip in keys if flip} == flippable
        assert [i for i, flip in keys if not flip] == list(range(len(items)))


def test_an_images_own_multiply_repeats_it(tmp_path: Path):
    images(tmp_path, "thrice", "never", "plain", "half1", "half2")
    write(tmp_path / "thrice.yaml", "multiply: 3\n")
    write(tmp_path / "never.yaml", "multiply: 0\n")
    for name in ("half1", "half2"):  # the fraction picks that share of the folder's images with that multiply
        write(tmp_path / f"{name}.yaml", "multiply: 1.5\n")
    items = scan_data_root(tmp_path, 64).items
    index = {item.path.stem: i for i, item in enumerate(items)}
    halves = set()
    for epoch in range(6):
        rows = Counter(d.index for b in epoch_batches(items, 2, 0.0, seed=5, epoch=epoch) for d in b if d.weight)
        assert (rows[index["thrice"]], rows[index["never"]], rows[index["plain"]]) == (3, 0, 1)
        assert sorted((rows[index["half1"]], rows[index["half2"]])) == [1, 2]
        halves.add(rows[index["half1"]])
    assert halves == {1, 2}  # drawn anew each epoch


def test_cond_dropout_shuffle_tags_and_loss_scale_reach_the_rows(tmp_path: Path):
    images(tmp_path / "dropped", "d1", "d2")
    write(tmp_path / "dropped" / "cond_dropout.txt", "1.0")
    images(tmp_path / "shuffled", "s1", "s2")
    write(tmp_path / "shuffled" / "local.yaml", "shuffle_tags: true\nloss_scale: 0.5\n")
    images(tmp_path / "heavy", "x1", "x2", "x3")
    write(tmp_path / "heavy" / "loss_scale.txt", "2")
    items = scan_data_root(tmp_path, 64).items
    dataset = TrainDataset(items, clip_tokenizer(), options(tmp_path, cond_dropout=0.0, shuffle_tags=False))
    rows = [d for epoch in range(4) for batch in epoch_batches(items, 2, 0.0, 9, epoch) for d in batch]
    folder = {id(d): items[d.index].path.parent.name for d in rows}
    captions: dict[str, set[str]] = {}
    for draw in rows:
        captions.setdefault(folder[id(draw)], set()).add(dataset.caption(draw))
    assert captions["dropped"] == {""}
    assert captions["heavy"] == {f"x{i}, tag a, tag b, tag c" for i in (1, 2, 3)}  # the run's: no shuffle
    assert len(captions["shuffled"]) > 2 and all(c.startswith(("s1, ", "s2, ")) for c in captions["shuffled"])
    weights = {(folder[id(d)], d.weight, dataset.loss_weight(d)) for d in rows}
    assert weights == {("dropped", 1.0, 1.0), ("shuffled", 1.0, 0.5), ("heavy", 1.0, 2.0), ("heavy", 0.0, 0.0)}
    filler = next(d for d in rows if d.weight == 0.0)
    row = dataset[filler]
    assert row["loss_weight"].item() == 0.0 and row["pixel_values"].shape == (3, 64, 64)
    assert dataset[next(d for d in rows if folder[id(d)] == "heavy" and d.weight)]["loss_weight"].item() == 2.0


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("name, text, expected", [
    ("flip_p.txt", "1.5", "'1.5'; expected a probability from 0 to 1"),
    ("cond_dropout.txt", "often", "'often'; expected a probability from 0 to 1"),
    ("loss_scale.txt", "-1", "'-1'; expected a number >= 0"),
    ("multiply.txt", "nan", "'nan'; expected one number >= 0"),
    ("batch_id.txt", "", "''; expected a group name"),
    ("local.yaml", "flip_p: yes\n", "flip_p: True; expected a probability from 0 to 1"),
    ("global.yaml", "multiply: [2]\n", "multiply: [2]; expected one number >= 0"),
    ("local.yml", "batch_id: {a: 1}\n", "batch_id: {'a': 1}; expected a group name"),
    ("img.yaml", "loss_scale: '2'\n", "loss_scale: '2' (text); expected a number >= 0"),
    ("img.yaml", "shuffle_tags: 1\n", "shuffle_tags: 1; expected true or false"),
    ("local.yaml", "- flip_p: 1\n", "must hold a mapping of keys such as flip_p: 0.5, found list"),
    ("global.yaml", "flip_p: [1\n", "is not valid yaml"),
])
def test_a_bad_value_stops_the_scan_naming_the_file(tmp_path: Path, name: str, text: str, expected: str):
    images(tmp_path / "sub", "img")
    path = write(tmp_path / "sub" / name, text)
    with pytest.raises(DataError) as raised:
        scan_data_root(tmp_path, 64)
    message = str(raised.value)
    assert message.startswith(str(path)) and expected in message, message
    assert "Correct" in message or "not valid" in message or "mapping" in message


def test_every_bad_file_is_named_at_once_and_an_unreadable_image_yaml_skips_its_image(tmp_path: Path):
    images(tmp_path, "a", "b", "c")
    write(tmp_path / "flip_p.txt", "2")
    write(tmp_path / "a.yaml", "cond_dropout: -0.1\n")
    write(tmp_path / "c.yaml", "flip_p: [0.5\n")  # cannot be read at all: like a broken caption, skipped
    with pytest.raises(DataError) as raised:
        scan_data_root(tmp_path, 64)
    message = str(raised.value)
    assert message.startswith(f"2 settings files under {tmp_path} hold values that cannot be used; correct each, "
                              "or delete it:\n")
    assert f"  {tmp_path / 'flip_p.txt'} holds '2'" in message and f"  {tmp_path / 'a.yaml'} holds cond" in message
    (tmp_path / "flip_p.txt").unlink()
    (tmp_path / "a.yaml").unlink()
    scan = scan_data_root(tmp_path, 64)
    assert [i.path.stem for i in scan.items] == ["a", "b"]
    assert [(p.name, "is not valid yaml" in why) for p, why in scan.skipped] == [("c.png", True)]


# ---------------------------------------------------------------- the report


def test_the_report_names_where_settings_differ_and_the_keys_not_used(tmp_path: Path, monkeypatch):
    images(tmp_path, "top1", "top2")
    images(tmp_path / "horses", "h1", "h2", "h3")
    write(tmp_path / "horses" / "batch_id.txt", "horses")
    write(tmp_path / "horses" / "local.yaml", "flip_p: 0\ncond_droput: 0.1\ntags: [in the style of xyz]\n")
    write(tmp_path / "horses" / "h3.yaml", "flip_p: 1\nloss_scale: 2\nrating: 3\n")
    images(tmp_path / "more", *(f"m{i}" for i in range(4)))
    for i in range(4):
        write(tmp_path / "more" / f"m{i}.yaml", f"multiply: {i + 2}\n")
    scan = scan_data_root(tmp_path, 64)
    summary = scan.summary()
    assert ("Data: flip_p from data files for 3 of 9 images: horses 0 (2 images), horses/h3.png 1; "
            "the others use the run's flip_p.") in summary
    assert ("Data: batch_id from data files for 3 of 9 images: horses \"horses\" (3 images); images of different "
            "batch_ids never share a batch, the others batch together.") in summary
    assert "Data: loss_scale from data files for 1 of 9 images: horses/h3.png 2; the others use 1." in summary
    assert not any(line.startswith(("Data: cond_dropout", "Data: shuffle_tags")) for line in summary)
    unused = summary[summary.index("Data: 2 settings file(s) hold keys not used here, ignored:"):][1:3]
    assert unused[0] == ("  horses/local.yaml: cond_droput (did you mean cond_dropout?); tags (folder captions are "
                         "not used here; put the words in each image's caption)")
    assert unused[1].startswith("  horses/h3.yaml: rating (rated data sets are not used here")
    monkeypatch.setattr(data.scan, "LISTED_AT_MOST", 2)
    multiply = [line for line in scan.summary() if line.startswith("Data: multiply")]
    assert multiply == ["Data: multiply from data files for 4 of 9 images: more/m0.png x2 per epoch, more/m1.png x3 "
                        "per epoch, and 2 more; the others train once per epoch."]


def test_data_without_settings_files_reports_as_before(tmp_path: Path):
    images(tmp_path, "a", "b")
    assert scan_data_root(tmp_path, 64).summary() == [f"Data: 2 images in {tmp_path}, 0 skipped.",
                                                      "Data: images per bucket: 64x64 2"]


@pytest.mark.slow
def test_the_dry_run_prints_the_settings_and_refuses_a_bad_one(tmp_path: Path):
    data_root = tmp_path / "data"
    images(data_root / "faces", "f1", "f2")
    write(data_root / "faces" / "flip_p.txt", "0")
    args = [sys.executable, str(REPO_ROOT / "train.py"), "--dry_run", "--data_root", str(data_root),
            "--resolution", "64", "--batch_size", "1", "--flip_p", "0.5", "--resume_ckpt", "someone/some-model"]
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Data: flip_p from data files for 2 of 2 images: faces 0 (2 images)" in done.stdout
    write(data_root / "faces" / "loss_scale.txt", "heavy")
    done = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{data_root / 'faces' / 'loss_scale.txt'} holds 'heavy'; expected a number >= 0" in done.stderr


# ---------------------------------------------------------------- data without settings: the schedule as before


def pinned_items() -> list[ImageItem]:
    """27 items in 6 folders, 3 buckets, multiply 1, 2.5, 0.4, 0 and 1.5, no other settings: no files needed."""
    spec = [("", 1.0, 5), ("a", 2.5, 4), ("a/b", 0.4, 6), ("c", 1.0, 3), ("d", 0.0, 2), ("e", 1.5, 5)]
    buckets = [Bucket(64, 64), Bucket(128, 64), Bucket(64, 128)]
    items = []
    for folder, multiply, count in spec:
        for k in range(count):
            bucket = buckets[(len(items) * 7 + k) % 3]
            items.append(ImageItem(Path("/data") / folder / f"img_{k:02d}.png", f"cap {len(items)}",
                                   (bucket.width, bucket.height), bucket, multiply, False))
    return items


# (batch size, flip_p, seed, epoch) -> (batches, sha256 of their rows), from epoch_batches before per-image
# settings existed (commit c73502b)
PINNED = {
    (1, 0.0, 0, 0): (27, "8fa41e29fb8e4766e12e4a4effdf40a4"),
    (2, 0.5, 7, 0): (14, "3fff0f6b9cd75f329ce79ac862ee18dd"),
    (2, 0.5, 7, 1): (14, "bdbb6d87651b92c18ad893926cdfee05"),
    (3, 0.25, 123, 5): (10, "04b27fd9aee997847fa4d58567642584"),
    (4, 1.0, 555, 2): (7, "e929670b2e856ad8f21671b8cca4682c"),
}
# epoch_batches(pinned_items()[:9], 2, 0.5, 3, 1) then: (index, flip, seed % 1000, weight)
PINNED_SMALL = [
    [(5, True, 367, 1.0), (4, True, 259, 0.0)], [(5, False, 293, 1.0), (8, True, 474, 1.0)],
    [(4, True, 259, 1.0), (1, False, 906, 1.0)], [(0, True, 694, 1.0), (7, False, 998, 1.0)],
    [(7, True, 776, 1.0), (3, False, 481, 0.0)], [(2, False, 316, 1.0), (6, True, 118, 0.0)],
    [(8, True, 216, 1.0), (5, True, 838, 1.0)], [(6, True, 118, 1.0), (6, True, 137, 1.0)],
    [(3, False, 481, 1.0), (7, True, 653, 1.0)],
]


def test_the_schedule_of_data_without_settings_is_draw_for_draw_as_before():
    items = pinned_items()
    for (batch_size, flip_p, seed, epoch), expected in PINNED.items():
        batches = epoch_batches(items, batch_size, flip_p, seed, epoch)
        rows = [[(d.index, d.flip, d.seed, d.weight) for d in batch] for batch in batches]
        assert (len(batches), hashlib.sha256(repr(rows).encode()).hexdigest()[:32]) == expected
    small = epoch_batches(items[:9], 2, 0.5, 3, 1)
    assert [[(d.index, d.flip, d.seed % 1000, d.weight) for d in batch] for batch in small] == PINNED_SMALL
    assert {str(b): rows for b, rows in epoch_items(items, 7, 0).items()} == {
        "64x64": [0, 3, 7, 7, 7, 12, 15, 22], "64x128": [1, 4, 5, 8, 5, 8, 5, 10, 16, 20, 23, 20],
        "128x64": [2, 6, 6, 17, 21, 24, 24]}
    assert (batches_per_epoch(items, 2), batches_per_epoch(items, 3)) == (14, 10)


def test_every_bad_file_of_one_folder_is_named_at_once(tmp_path: Path):
    images(tmp_path / "b", "x.png")
    write(tmp_path / "b" / "batch_id.txt", "")
    write(tmp_path / "b" / "loss_scale.txt", "-1")
    with pytest.raises(DataError) as err:
        scan_data_root(tmp_path, 64)
    assert "batch_id.txt" in str(err.value) and "loss_scale.txt" in str(err.value)
