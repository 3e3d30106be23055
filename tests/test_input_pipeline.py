"""Tests of experiments.input_pipeline: ids, determinism, resume, eval padding, sharding, sources."""

import io
import os
import random

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import input_pipeline as ip

MEAN = np.asarray(ip.CIFAR10_MEAN, np.float64)
STD = np.asarray(ip.CIFAR10_STD, np.float64)


def _indexed_source(n: int) -> ip.ArraySource:
    """32x32 RGB images whose every pixel encodes the record index: (i % 256, i // 256, 7)."""
    ids = np.arange(n)
    pixel = np.stack([ids % 256, ids // 256, np.full(n, 7)], axis=-1).astype(np.uint8)
    images = np.broadcast_to(pixel[:, None, None, :], (n, 32, 32, 3)).copy()
    return ip.ArraySource(images, ids % 10)


def _decode_ids(images: np.ndarray) -> np.ndarray:
    """Inverse of _indexed_source after CIFAR normalisation, read at the centre pixel.

    A pad-4 random crop moves the image by at most 4 pixels and a flip mirrors it, so the
    centre pixel always comes from the original image (never from the zero padding).
    """
    pixel = np.rint((images[:, 16, 16, :].astype(np.float64) * STD + MEAN) * 255).astype(int)
    assert np.all(pixel[:, 2] == 7)
    return pixel[:, 0] + 256 * pixel[:, 1]


def _denormalize(images: np.ndarray) -> np.ndarray:
    return np.rint((images.astype(np.float64) * STD + MEAN) * 255).astype(np.int64)


def _ids(batches):
    return [b["id"].tolist() for b in batches]


# --------------------------------------------------------------------------------------------------
# Ids travel with their examples.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_count,num_threads", [(1, 0), (1, 3), (2, 2)])
def test_id_travels_with_its_example(process_count, num_threads):
    source = _indexed_source(300)  # Indices up to 299 use both encoding channels.
    prep = ip.get_preprocess("cifar10", train=True)
    for epoch in (0, 1):
        for p in range(process_count):
            batches = list(
                ip.train_batches(
                    source,
                    epoch,
                    16,
                    seed=3,
                    preprocess=prep,
                    process_index=p,
                    process_count=process_count,
                    num_threads=num_threads,
                    prefetch_buffer_size=2,
                )
            )
            assert len(batches) == 300 // 16
            for b in batches:
                assert b["image"].shape == (16 // process_count, 32, 32, 3)
                assert b["image"].dtype == np.float32
                assert b["id"].dtype == np.int32 and b["label"].dtype == np.int32
                np.testing.assert_array_equal(_decode_ids(b["image"]), b["id"])
                np.testing.assert_array_equal(b["label"], b["id"] % 10)


def test_eval_ids_travel_with_examples_and_match_plain_normalisation():
    source = _indexed_source(37)
    for b in ip.eval_batches(
        source, 8, preprocess=ip.get_preprocess("cifar10", train=False), num_threads=2
    ):
        real = b["mask"]
        np.testing.assert_array_equal(_decode_ids(b["image"][real]), b["id"][real])
        # Independent reference: (x / 255 - mean) / std of the stored image.
        expected = (source.images[b["id"][real]] / 255.0 - MEAN) / STD
        np.testing.assert_allclose(b["image"][real], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Augmentation.
# --------------------------------------------------------------------------------------------------


def test_crop_flip_is_a_window_of_the_zero_padded_image():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    source = ip.ArraySource(images, np.zeros(24, np.int64))
    batch = next(
        ip.train_batches(source, 0, 24, seed=1, preprocess=ip.get_preprocess("cifar10", train=True))
    )
    offsets = set()
    for image, i in zip(_denormalize(batch["image"]), batch["id"]):
        padded = np.pad(images[i].astype(np.int64), ((4, 4), (4, 4), (0, 0)))
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if np.array_equal(
                image,
                padded[dy : dy + 32, dx : dx + 32][:, ::-1]
                if flip
                else padded[dy : dy + 32, dx : dx + 32],
            )
        ]
        assert len(matches) == 1, matches
        offsets.add(matches[0])
    assert len(offsets) > 12  # The crops really are random.
    assert {m[2] for m in offsets} == {False, True}


def test_cutout_zeroes_one_clipped_square():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(32, 32, 3), dtype=np.uint8)
    prep = ip.get_preprocess("cifar10", train=True, cutout_size=8, crop_padding=0)
    seen_sizes = set()
    for i in range(40):
        out = prep({"image": image, "label": 0}, np.random.default_rng(i))
        zero = np.all(out == 0, axis=-1)
        rows, cols = np.where(zero.any(axis=1))[0], np.where(zero.any(axis=0))[0]
        h, w = len(rows), len(cols)
        assert 4 <= h <= 8 and 4 <= w <= 8
        assert np.all(zero[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        assert zero.sum() == h * w
        seen_sizes.add((h, w))
    assert (8, 8) in seen_sizes and len(seen_sizes) > 1  # Clipped at the border sometimes.


def test_imagenet_preprocessing_from_encoded_and_decoded_images():
    rng = np.random.default_rng(0)
    encoded = []
    for h, w in [(40, 60), (64, 48), (30, 30), (50, 50)]:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
        encoded.append(buf.getvalue())
    source = ip.ArraySource(np.array(encoded, dtype=object), np.arange(4))
    train = next(
        ip.train_batches(
            source,
            0,
            4,
            seed=0,
            preprocess=ip.get_preprocess("imagenet2012", train=True, image_size=16),
        )
    )
    assert train["image"].shape == (4, 16, 16, 3) and np.isfinite(train["image"]).all()
    evals = list(
        ip.eval_batches(
            source, 3, preprocess=ip.get_preprocess("imagenet2012", train=False, image_size=16)
        )
    )
    assert [b["image"].shape for b in evals] == [(3, 16, 16, 3)] * 2
    assert evals[1]["mask"].tolist() == [True, False, False]

    # Resize-then-centre-crop, checked on an image with a black left and white right half:
    # short side 256 -> 224 / 0.875 = 256 (no resize), crop columns 144..367 of 512.
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 256:] = 255
    out = ip.resize_center_crop(image, 224)
    assert out.shape == (224, 224, 3)
    assert np.all(out[:, :112] == 0) and np.all(out[:, 112:] == 255)
    # The inception crop is a deterministic function of the generator.
    a = ip.inception_crop(encoded[0], np.random.default_rng(5), 16)
    b = ip.inception_crop(encoded[0], np.random.default_rng(5), 16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8


def test_mnist_and_mnist1d_preprocessing():
    image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28, 1) % 256
    out = ip.get_preprocess("mnist", train=True)({"image": image.astype(np.uint8)}, None)
    np.testing.assert_allclose(out, (image / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)
    signal = np.linspace(-1, 1, 40)
    out = ip.get_preprocess("mnist1d", train=True)({"image": signal}, None)
    assert out.dtype == np.float32 and out.shape == (40,)
    np.testing.assert_allclose(out, signal, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Determinism, epochs, resume.
# --------------------------------------------------------------------------------------------------


def test_epochs_differ_but_are_deterministic_per_seed():
    source = _indexed_source(64)
    prep = ip.get_preprocess("cifar10", train=True, cutout_size=8)

    def epoch(e, seed=0, **kw):
        return list(ip.train_batches(source, e, 16, seed, preprocess=prep, **kw))

    first, again, threaded = epoch(0), epoch(0), epoch(0, num_threads=3)
    for a, b, c in zip(first, again, threaded):
        for k in ("image", "label", "id"):
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], c[k])
    order = [i for b in first for i in b["id"].tolist()]
    assert sorted(order) == list(range(64))  # A permutation: every example once.
    assert order != list(range(64))
    for other in (epoch(1), epoch(0, seed=1)):
        other_order = [i for b in other for i in b["id"].tolist()]
        assert sorted(other_order) == list(range(64)) and other_order != order
    # An example's augmentation depends on the epoch too.
    e1 = {i: img for b in epoch(1) for i, img in zip(b["id"].tolist(), b["image"])}
    e0 = {i: img for b in first for i, img in zip(b["id"].tolist(), b["image"])}
    assert sum(not np.array_equal(e0[i], e1[i]) for i in range(64)) > 32


def test_train_epoch_drops_the_remainder():
    source = _indexed_source(50)
    batches = list(ip.train_batches(source, 0, 16, seed=0))
    assert len(batches) == ip.steps_per_epoch(50, 16) == 3
    ids = [i for b in batches for i in b["id"].tolist()]
    assert len(ids) == len(set(ids)) == 48 and set(ids) <= set(range(50))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_resume_from_step_gives_identical_remaining_batches(num_threads):
    source = _indexed_source(80)
    prep = ip.get_preprocess("cifar10", train=True, cutout_size=8)
    kw = {"preprocess": prep, "num_threads": num_threads}
    full = list(ip.train_batches(source, 2, 8, 7, **kw))
    assert len(full) == 10
    dataset = ip.train_dataset(source, 2, 8, 7, preprocess=prep)
    for start in (0, 3, 9, 10):
        resumed = list(ip.train_batches(source, 2, 8, 7, start_step=start, **kw))
        assert len(resumed) == 10 - start
        for a, b in zip(full[start:], resumed):
            for k in ("image", "label", "id"):
                np.testing.assert_array_equal(a[k], b[k])
        if start < 10:
            np.testing.assert_array_equal(dataset[start]["image"], full[start]["image"])


# --------------------------------------------------------------------------------------------------
# Eval padding and multi-process sharding.
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_mask_covers_every_example_exactly_once(process_count):
    n, batch_size = 37, 8
    source = _indexed_source(n)
    seen = []
    for p in range(process_count):
        batches = list(
            ip.eval_batches(
                source,
                batch_size,
                preprocess=ip.get_preprocess("cifar10", train=False),
                process_index=p,
                process_count=process_count,
            )
        )
        assert len(batches) == ip.num_eval_steps(n, batch_size) == 5
        for b in batches:
            assert b["mask"].dtype == bool and len(b["mask"]) == batch_size // process_count
            seen += b["id"][b["mask"]].tolist()
            pad = ~b["mask"]
            assert np.all(b["id"][pad] == -1) and np.all(b["label"][pad] == 0)
            assert np.all(b["image"][pad] == 0)
    assert sorted(seen) == list(range(n))


def test_eval_with_exact_multiple_has_no_padding():
    batches = list(ip.eval_batches(_indexed_source(32), 8))
    assert len(batches) == 4 and all(b["mask"].all() for b in batches)


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding_splits_each_global_batch_disjointly_and_completely(process_count):
    source = _indexed_source(96)
    prep = ip.get_preprocess("cifar10", train=True)
    single = list(
        ip.train_batches(source, 1, 16, 5, preprocess=prep, process_count=1, process_index=0)
    )
    per_process = [
        list(
            ip.train_batches(
                source, 1, 16, 5, preprocess=prep, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    all_ids = []
    for step, global_batch in enumerate(single):
        parts = [per_process[p][step] for p in range(process_count)]
        # Process p holds the p-th block of the global batch: ids AND augmented images.
        np.testing.assert_array_equal(np.concatenate([b["id"] for b in parts]), global_batch["id"])
        np.testing.assert_array_equal(
            np.concatenate([b["image"] for b in parts]), global_batch["image"]
        )
        all_ids += global_batch["id"].tolist()
    assert sorted(all_ids) == list(range(96))  # Disjoint and complete over the epoch.


def test_bad_arguments_raise_clear_errors():
    source = _indexed_source(20)
    with pytest.raises(ValueError, match="divisible by process_count"):
        ip.train_batches(source, 0, 10, 0, process_count=3, process_index=0)
    with pytest.raises(ValueError, match="larger than the source"):
        ip.train_batches(source, 0, 32, 0)
    with pytest.raises(ValueError, match="start_step"):
        ip.train_batches(source, 0, 8, 0, start_step=3)
    with pytest.raises(ValueError, match="process_index"):
        ip.eval_batches(source, 8, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="epoch"):
        ip.train_batches(source, -1, 8, 0)
    with pytest.raises(ValueError, match="batch_size"):
        ip.eval_batches(source, 0)
    with pytest.raises(ValueError, match="unknown dataset"):
        ip.get_dataset_info("cifar11")
    with pytest.raises(ValueError, match="same leading length"):
        ip.ArraySource(np.zeros((3, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="imagenet2012"):
        ip.make_source("imagenet2012", "train", "/nonexistent", in_memory=True)


# --------------------------------------------------------------------------------------------------
# Sources: TFDS (mocked) and MNIST-1D.
# --------------------------------------------------------------------------------------------------


def test_dataset_info():
    info = ip.get_dataset_info("cifar100")
    assert (info.num_classes, info.input_shape, info.num_train, info.num_test) == (
        100,
        (32, 32, 3),
        50_000,
        10_000,
    )
    imagenet = ip.get_dataset_info("imagenet2012", image_size=128)
    assert imagenet.input_shape == (128, 128, 3) and imagenet.eval_split == "validation"
    assert ip.get_dataset_info("mnist").input_shape == (28, 28, 1)
    assert ip.get_dataset_info("mnist1d").input_shape == (40,)
    assert set(ip.DATASET_NAMES) == {"cifar10", "cifar100", "imagenet2012", "mnist", "mnist1d"}


def test_cifar_pipeline_on_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
        source = ip.make_source("cifar10", "train", data_dir=tmp_path)
        assert len(source) == 24
        labels = [int(source[i]["label"]) for i in range(24)]
        prep = ip.get_preprocess("cifar10", train=True, cutout_size=8)
        batches = list(ip.train_batches(source, 0, 8, seed=0, preprocess=prep, num_threads=2))
        assert len(batches) == 3
        for b in batches:
            assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
            assert np.isfinite(b["image"]).all()
            assert b["label"].tolist() == [labels[i] for i in b["id"]]
        assert sorted(i for b in batches for i in b["id"].tolist()) == list(range(24))
        eval_prep = ip.get_preprocess("cifar10", train=False)
        evals = list(ip.eval_batches(source, 10, preprocess=eval_prep))
        assert [int(b["mask"].sum()) for b in evals] == [10, 10, 4]
        first = source[evals[0]["id"][0]]["image"]
        np.testing.assert_allclose(
            evals[0]["image"][0], (first / 255.0 - MEAN) / STD, rtol=1e-5, atol=1e-5
        )

        # In memory: same records, same ids, hence the same batches.
        memory = ip.make_source("cifar10", "train", data_dir=tmp_path, in_memory=True)
        assert isinstance(memory, ip.ArraySource) and len(memory) == 24
        for a, b in zip(batches, ip.train_batches(memory, 0, 8, seed=0, preprocess=prep)):
            for k in ("image", "label", "id"):
                np.testing.assert_array_equal(a[k], b[k])


def test_mnist1d_built_offline_and_cached(tmp_path, monkeypatch):
    from mnist1d import data as mnist1d_data

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must be built offline, never downloaded")

    monkeypatch.setattr(mnist1d_data.requests, "get", no_network)
    np_state, py_state = np.random.get_state(), random.getstate()

    data = ip.load_mnist1d(tmp_path, num_samples=200)
    assert data["x"].shape == (160, 40) and data["x"].dtype == np.float32
    assert data["x_test"].shape == (40, 40) and data["y_test"].dtype == np.int32
    assert set(np.unique(data["y"])) <= set(range(10))
    # The global RNGs that make_dataset reseeds are restored.
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert random.getstate() == py_state
    # Independent reference: the package's own generator with the same arguments.
    args = mnist1d_data.get_dataset_args()
    args.num_samples = 200
    reference = mnist1d_data.make_dataset(args)
    np.testing.assert_allclose(data["x"], reference["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data["y_test"], reference["y_test"])

    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("mnist1d_42_") and files[0].endswith(".npz")

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached file should have been used")

    monkeypatch.setattr(mnist1d_data, "make_dataset", no_rebuild)
    cached = ip.load_mnist1d(tmp_path, num_samples=200)
    for k in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(cached[k], data[k])

    source = ip.make_source(
        "mnist1d", "test", cache_dir=tmp_path, mnist1d_args={"num_samples": 200}
    )
    assert len(source) == 40 and source[3]["image"].shape == (40,)
    batch = next(
        ip.train_batches(source, 0, 8, 0, preprocess=ip.get_preprocess("mnist1d", train=True))
    )
    np.testing.assert_array_equal(batch["image"], data["x_test"][batch["id"]])
    np.testing.assert_array_equal(batch["label"], data["y_test"][batch["id"]])
    with pytest.raises(ValueError, match="unknown mnist1d arguments"):
        ip.load_mnist1d(tmp_path, num_sample=10)
    with pytest.raises(ValueError, match="splits"):
        ip.make_source("mnist1d", "validation", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------------------
# Label noise, cutout probability, the epoch permutation cache
# ------------------------------------------------------------------------------------------------


def test_symmetric_label_noise_flips_exactly_the_rate_to_other_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 1000).astype(np.int32)
    src = ip.ArraySource(np.arange(1000)[:, None].astype(np.float32), labels)
    out = ip.symmetric_label_noise(src, 0.3, 10, seed=4)
    new = out.source.labels
    changed = np.flatnonzero(new != labels)
    np.testing.assert_array_equal(changed, out.flipped_ids)  # every flip changes the label
    assert len(changed) == 300 and new.dtype == labels.dtype
    np.testing.assert_array_equal(new[changed], out.noisy_labels)
    np.testing.assert_array_equal(labels[changed], out.clean_labels)
    np.testing.assert_array_equal(out.source.images, src.images)  # images and ids untouched
    # Roughly uniform over the 9 wrong classes: offsets (noisy - clean) mod 10 in 1..9.
    offsets = np.bincount((out.noisy_labels - out.clean_labels) % 10, minlength=10)
    assert offsets[0] == 0 and offsets[1:].min() > 15
    # The flip set depends on the noise seed only.
    again = ip.symmetric_label_noise(src, 0.3, 10, seed=4)
    np.testing.assert_array_equal(again.flipped_ids, out.flipped_ids)
    other = ip.symmetric_label_noise(src, 0.3, 10, seed=5)
    assert not np.array_equal(other.flipped_ids, out.flipped_ids)
    assert len(ip.symmetric_label_noise(src, 0.0, 10, seed=4).flipped_ids) == 0


def test_symmetric_label_noise_rejects_bad_input():
    src = ip.ArraySource(np.zeros((4, 1)), np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="rate"):
        ip.symmetric_label_noise(src, 1.0, 4, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        ip.symmetric_label_noise(src, 0.5, 3, seed=0)
    with pytest.raises(TypeError, match="ArraySource"):
        ip.symmetric_label_noise([{"image": 0, "label": 0}], 0.5, 3, seed=0)


def test_cutout_probability():
    image = np.full((32, 32, 3), 128, np.uint8)
    record = {"image": image, "label": 0}
    hits = []
    for i in range(200):
        prep = ip.get_preprocess("cifar10", train=True, cutout_size=16, cutout_prob=0.5)
        x = prep(record, ip.example_rng(0, 0, i))
        hits.append(bool(np.any(x == 0.0)))
    assert 70 < sum(hits) < 130  # about half
    # cutout_prob=1 draws no extra number: the same output as before the option existed.
    a = ip.get_preprocess("cifar10", train=True, cutout_size=8)(record, ip.example_rng(0, 0, 1))
    rng = ip.example_rng(0, 0, 1)
    b = ip.cutout(ip.normalize(ip.random_crop_flip(image, rng), ip.CIFAR10_MEAN, ip.CIFAR10_STD), rng, 8)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cutout_prob"):
        ip.get_preprocess("cifar10", train=True, cutout_prob=1.5)


def test_epoch_permutation_cache_matches_grain_shuffle():
    import grain

    n = 37
    cached = ip._epoch_permutation(n, 3, 2)
    shuffled = grain.MapDataset.range(n).shuffle(seed=ip._epoch_shuffle_seed(3, 2))
    np.testing.assert_array_equal(cached, [shuffled[i] for i in range(n)])
    assert not cached.flags.writeable
    big = ip._epoch_permutation(ip._CACHED_PERMUTATION_MAX_EXAMPLES + 1, 3, 2)
    assert not isinstance(big, np.ndarray)  # large sources are not materialised


def test_preprocess_without_randomness_gets_no_generator():
    seen = []

    def spy(record, rng):
        seen.append(rng)
        return np.asarray(record["image"], np.float32)

    src = ip.ArraySource(np.zeros((8, 2), np.float32), np.arange(8) % 2)
    list(ip.train_batches(src, 0, 4, 0, preprocess=spy))
    assert all(isinstance(r, np.random.Generator) for r in seen)  # unmarked: always a generator
    spy.uses_rng = False
    seen.clear()
    list(ip.train_batches(src, 0, 4, 0, preprocess=spy))
    assert seen and all(r is None for r in seen)
    assert ip.get_preprocess("mnist1d", train=True).uses_rng is False
    assert ip.get_preprocess("cifar10", train=True).uses_rng is True
    assert ip.get_preprocess("cifar10", train=False).uses_rng is False
