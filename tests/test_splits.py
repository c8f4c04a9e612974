"""Splits: published counts, determinism over (seed, index), list files in both formats, the manifest."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from dcc.data.build import DataBundle, build_data
from dcc.data.files import DataError
from dcc.data.splits import generate_labeled, labeled_count, split_manifest, write_split_manifest
from tests.conftest import compose_cfg
from tests.realdata import VOC_EXTRA, VOC_FINE, city_names, make_cityscapes, make_voc


def split_indices(num_train: int, fraction: float, seed: int, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The digits split of earlier releases (was dcc.data.build.split_indices): list ``index`` of ``seed``."""
    n_labeled = max(1, int(round(num_train * fraction)))
    labeled = generate_labeled(np.arange(num_train), n_labeled, seed, index)
    unlabeled = np.setdiff1d(np.arange(num_train), labeled) if n_labeled < num_train else np.arange(num_train)
    return labeled, unlabeled


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def _cfg(root, *extra):
    return compose_cfg(["experiment=none", "dataset=voc", f"dataset.root={root}", *extra])


@pytest.mark.parametrize("split, published", [("'1_16'", 662), ("'1_8'", 1323), ("'1_4'", 2645), ("full", 10582)])
def test_published_voc_counts_on_the_complete_pool(split, published):
    assert labeled_count(compose_cfg(["experiment=none", "dataset=voc", f"split={split}"]), 10582) == published
    # VOC classic: the fraction of the 1,464 fine images (all of them with split=full)
    classic = compose_cfg(["experiment=none", "dataset=voc", "dataset.protocol=classic", f"split={split}"])
    assert labeled_count(classic, 1464) == {662: 92, 1323: 183, 2645: 366, 10582: 1464}[published]


@pytest.mark.parametrize("split, published", [("'1_8'", 372), ("'1_4'", 744), ("full", 2975)])
def test_published_cityscapes_counts(split, published):
    assert labeled_count(compose_cfg(["experiment=none", "dataset=cityscapes", f"split={split}"]), 2975) == published


def test_incomplete_pool_falls_back_to_the_fraction():
    assert labeled_count(compose_cfg(["experiment=none", "dataset=voc", "split='1_8'"]), 16) == 2


def test_generation_is_deterministic_per_seed_and_index():
    pool = np.arange(100, 300)
    a = generate_labeled(pool, 25, seed=42, index=0)
    assert np.array_equal(a, generate_labeled(pool, 25, seed=42, index=0))
    assert len(set(a.tolist())) == 25 and set(a.tolist()) <= set(pool.tolist()) and np.all(np.diff(a) > 0)
    lists = [generate_labeled(pool, 25, seed=42, index=i) for i in range(3)]
    assert all(not np.array_equal(lists[i], lists[j]) for i in range(3) for j in range(i))
    assert not np.array_equal(a, generate_labeled(pool, 25, seed=7, index=0))
    # the digits split of earlier releases is list 0 of its seed
    perm = np.random.default_rng(42).permutation(48)
    labeled, unlabeled = split_indices(48, 0.25, 42)
    assert np.array_equal(labeled, np.sort(perm[:12])) and np.array_equal(unlabeled, np.sort(perm[12:]))


def test_build_data_split_and_manifest_are_reproducible(voc_root):
    data = build_data(_cfg(voc_root, "split='1_4'", "split.index=1"))
    again = build_data(_cfg(voc_root, "split='1_4'", "split.index=1"))
    other = build_data(_cfg(voc_root, "split='1_4'", "split.index=2"))
    assert len(data.labeled) == 3 and len(data.unlabeled) == 9  # 12 training images
    assert np.array_equal(data.labeled, again.labeled)
    assert sorted(data.labeled.tolist() + data.unlabeled.tolist()) == list(range(12))
    m, m2, m3 = (split_manifest(_cfg(voc_root, "split='1_4'", f"split.index={i}"), d)
                 for i, d in ((1, data), (1, again), (2, other)))
    assert m["sha256"] == m2["sha256"]
    assert not np.array_equal(data.labeled, other.labeled) and m["sha256"] != m3["sha256"]
    assert m["origin"] == "seed=42 index=1"


def test_list_files_in_both_formats_select_the_same_images(voc_root, tmp_path):
    chosen = [VOC_EXTRA[1], VOC_FINE[2], VOC_EXTRA[5]]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in chosen))
    ids = tmp_path / "ids.txt"
    ids.write_text("# ids only\n" + "".join(f"{i}\n" for i in chosen) + "\n")
    a = build_data(_cfg(voc_root, f"split.labeled_list={pairs}"))
    b = build_data(_cfg(voc_root, f"split.labeled_list={ids}"))
    assert np.array_equal(a.labeled, b.labeled)
    assert sorted(a.train.ids[i] for i in a.labeled) == sorted(chosen)
    assert len(a.unlabeled) == 12 - 3 and not set(a.unlabeled.tolist()) & set(a.labeled.tolist())
    unl = tmp_path / "unl.txt"
    unl.write_text(f"{VOC_EXTRA[0]}\n{VOC_EXTRA[2]}.jpg\n")
    c = build_data(_cfg(voc_root, f"split.labeled_list={ids}", f"split.unlabeled_list={unl}"))
    assert sorted(c.train.ids[i] for i in c.unlabeled) == [VOC_EXTRA[0], VOC_EXTRA[2]]
    m = split_manifest(_cfg(voc_root, f"split.labeled_list={ids}"), b)
    assert m["num_labeled"] == 3 and m["num_fine"] == 1 and m["origin"] == f"list {ids}"


def test_list_file_errors_name_file_and_line(voc_root, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{VOC_FINE[0]}\n/JPEGImages/2099_000001.jpg /SegmentationClassAug/2099_000001.png\n")
    with pytest.raises(DataError, match=rf"{bad}:2: '/JPEGImages/2099_000001.jpg' is not an image of the training set"):
        build_data(_cfg(voc_root, f"split.labeled_list={bad}"))
    bad.write_text(f"{VOC_FINE[0]}\n{VOC_FINE[1]}\n{VOC_FINE[0]}\n")
    with pytest.raises(DataError, match=rf"{bad}:3: .* repeats line 1"):
        build_data(_cfg(voc_root, f"split.labeled_list={bad}"))
    bad.write_text(f"{VOC_FINE[0]}\n{VOC_EXTRA[0]}\n")  # an SBD-only image has no label under classic
    with pytest.raises(DataError, match=rf"1 listed images have no label under this protocol, e.g. {VOC_EXTRA[0]}"):
        build_data(_cfg(voc_root, f"split.labeled_list={bad}", "dataset.protocol=classic"))
    with pytest.raises(DataError, match="cannot read list file"):
        build_data(_cfg(voc_root, f"split.labeled_list={tmp_path / 'absent.txt'}"))


def test_manifest_text_hash_and_fine_count(voc_root, tmp_path):
    cfg = _cfg(voc_root, "split=full")
    data = build_data(cfg)
    fine_positions = [data.train.ids.index(i) for i in VOC_FINE]
    extra_positions = [data.train.ids.index(i) for i in VOC_EXTRA[:2]]
    bundle = DataBundle(data.train, data.val, np.array(sorted(fine_positions[:3] + extra_positions)),
                        np.array([data.train.ids.index(VOC_EXTRA[7])]))
    m = split_manifest(cfg, bundle)
    assert (m["num_labeled"], m["num_unlabeled"], m["num_fine"]) == (5, 1, 3)
    first = sorted(fine_positions[:3] + extra_positions)[0]
    assert m["labeled_text"].splitlines()[0] == (
        f"/JPEGImages/{data.train.ids[first]}.jpg /SegmentationClassAug/{data.train.ids[first]}.png")
    assert m["unlabeled_text"] == f"/JPEGImages/{VOC_EXTRA[7]}.jpg /SegmentationClassAug/{VOC_EXTRA[7]}.png\n"
    labeled_file, unlabeled_file = write_split_manifest(m, tmp_path / "manifest")
    both = f"# labeled\n{labeled_file.read_text()}# unlabeled\n{unlabeled_file.read_text()}"
    assert m["sha256"] == hashlib.sha256(both.encode()).hexdigest()
    assert m["labeled_sha256"] == hashlib.sha256(labeled_file.read_bytes()).hexdigest()
    # the written lists are valid list files: reading them back reproduces the split and its hash
    back = build_data(_cfg(voc_root, f"split.labeled_list={labeled_file}", f"split.unlabeled_list={unlabeled_file}"))
    assert np.array_equal(back.labeled, bundle.labeled) and np.array_equal(back.unlabeled, bundle.unlabeled)
    assert split_manifest(cfg, back)["sha256"] == m["sha256"]


def test_cityscapes_lists_by_path_or_id_and_no_fine_count(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    names = city_names("train")
    paths = tmp_path / "cs.txt"
    paths.write_text(
        f"leftImg8bit/train/aachen/{names[1]}_leftImg8bit.png gtFine/train/aachen/{names[1]}_gtFine_labelTrainIds.png\n"
        f"{names[3]}\n")
    cfg = compose_cfg(["experiment=none", "dataset=cityscapes", f"dataset.root={root}", f"split.labeled_list={paths}"])
    data = build_data(cfg)
    assert data.labeled.tolist() == [1, 3]
    m = split_manifest(cfg, data)
    assert m["num_fine"] is None and m["num_labeled"] == 2 and m["num_unlabeled"] == 3
