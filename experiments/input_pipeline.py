"""Input pipelines: TFDS random-access sources + grain, with global example ids.

Data comes from ``tfds.data_source`` (array_record files in any TFDS
``data_dir``; no TensorFlow is imported at train time) or, for MNIST-1D, from
an array source built offline with the ``mnist1d`` package and cached on disk.
Batches are assembled with ``grain.MapDataset``:

* **Every batch is a dict of numpy arrays**: ``'image'`` float32 (normalised,
  ``(B, *input_shape)``), ``'label'`` int32 ``(B,)`` and ``'id'`` int32 ``(B,)``,
  the example's **global record index** in the split (what SAF/MESA index
  their per-example buffers by). Eval batches add ``'mask'`` (bool): padding
  rows have ``mask=False``, ``id=-1``, ``label=0`` and a zero image.
* **Deterministic**: the epoch's order is a grain shuffle seeded by
  ``(seed, epoch)``; an example's augmentation draws from a numpy generator
  seeded by ``(seed, epoch, id)``. A batch is therefore a pure function of
  ``(seed, epoch, step)``: resuming with ``start_step`` reproduces the rest of
  the epoch exactly, with or without prefetch threads.
* **Multi-host**: ``batch_size`` is the GLOBAL batch size. Step ``s`` of an
  epoch consumes positions ``[s * batch_size, (s + 1) * batch_size)`` of the
  epoch's global permutation, and process ``p`` of ``P`` gets the ``p``-th
  contiguous block of ``batch_size // P`` of them: the rows that
  ``jax.make_array_from_process_local_data`` expects for a batch sharded over
  devices in process order. The global batch at every step, and the ids in it,
  are the same whatever the number of processes. Train epochs drop the last
  ``len(source) % batch_size`` examples of the permutation; eval covers every
  example exactly once and pads the last batch.
* **Small datasets**: ``make_source(..., in_memory=True)`` decodes CIFAR or
  MNIST once into an :class:`ArraySource` (same record indices), instead of
  decoding every PNG again each epoch.

Typical use::

    info = input_pipeline.get_dataset_info('cifar10')
    train = input_pipeline.make_source('cifar10', info.train_split, data_dir, in_memory=True)
    prep = input_pipeline.get_preprocess('cifar10', train=True)
    for batch in input_pipeline.train_batches(train, epoch, 128, seed, preprocess=prep):
        ...
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import grain
import jax
import numpy as np

Batch = dict[str, np.ndarray]
Record = Mapping[str, Any]
Preprocess = Callable[[Record, np.random.Generator], np.ndarray]


class RandomAccessSource(Protocol):
    """What the pipeline reads: ``len(source)`` and ``source[i] -> {'image', 'label', ...}``."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


# --------------------------------------------------------------------------------------------------
# Dataset metadata.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes:
      name: dataset name as accepted by :func:`make_source`.
      num_classes: number of labels.
      input_shape: shape of one preprocessed example (what the model sees).
      num_train: examples in ``train_split``.
      num_test: examples in ``eval_split``.
      train_split: TFDS split used for training.
      eval_split: TFDS split used for evaluation (``'validation'`` for ImageNet).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    num_train: int
    num_test: int
    train_split: str = "train"
    eval_split: str = "test"


# Canonical sizes of the full datasets (TFDS catalog). A data_dir may hold a
# different build (e.g. a subset): pass data_dir to get_dataset_info to read its
# real sizes, and trust len(source) in any case.
_DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), 50_000, 10_000),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), 50_000, 10_000),
    "imagenet2012": DatasetInfo(
        "imagenet2012", 1000, (224, 224, 3), 1_281_167, 50_000, eval_split="validation"
    ),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), 60_000, 10_000),
    # mnist1d with the package's default arguments (5000 samples, 80/20 split).
    "mnist1d": DatasetInfo("mnist1d", 10, (40,), 4_000, 1_000),
}

DATASET_NAMES: tuple[str, ...] = tuple(_DATASETS)

# Per-channel statistics of the training sets, on [0, 1] pixel values.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def _check_name(name: str) -> None:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASET_NAMES)}.")


def get_dataset_info(
    name: str, data_dir: str | os.PathLike | None = None, *, image_size: int = 224
) -> DatasetInfo:
    """Returns the :class:`DatasetInfo` of dataset ``name``.

    Args:
      name: one of :data:`DATASET_NAMES` (``'cifar10'``, ``'cifar100'``,
        ``'imagenet2012'``, ``'mnist'``, ``'mnist1d'``).
      data_dir: optional TFDS data_dir; if given, the split sizes are read from
        the prepared dataset there (it may be a subset of the full dataset).
        Ignored for ``'mnist1d'``.
      image_size: ImageNet only: side of the preprocessed square image.

    Returns:
      The dataset's info.

    Example:
      >>> from experiments import input_pipeline
      >>> info = input_pipeline.get_dataset_info('cifar10')
      >>> info.num_classes, info.input_shape, info.num_train
      (10, (32, 32, 3), 50000)
    """
    _check_name(name)
    info = _DATASETS[name]
    if name == "imagenet2012":
        info = dataclasses.replace(info, input_shape=(image_size, image_size, 3))
    if data_dir is not None and name != "mnist1d":
        import tensorflow_datasets as tfds  # Lazy: only metadata is read, no TensorFlow.

        splits = tfds.builder(name, data_dir=os.fspath(data_dir)).info.splits
        try:
            info = dataclasses.replace(
                info,
                num_train=splits[info.train_split].num_examples,
                num_test=splits[info.eval_split].num_examples,
            )
        except KeyError as e:
            raise ValueError(
                f"dataset {name!r} is not prepared in data_dir={os.fspath(data_dir)!r} "
                f"(no split {e})."
            ) from e
    return info


# --------------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------------


class ArraySource:
    """Random-access source over in-memory arrays with the TFDS record interface.

    ``source[i]`` is ``{'image': images[i], 'label': labels[i]}``, as a TFDS
    ``data_source`` record, so the same pipeline reads both.

    Args:
      images: array of shape ``(N, ...)``.
      labels: integer array of shape ``(N,)``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images, labels = np.asarray(images), np.asarray(labels)
        if labels.ndim != 1 or images.shape[:1] != labels.shape:
            raise ValueError(
                f"images and labels must have the same leading length, got {images.shape} and "
                f"{labels.shape}."
            )
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def __repr__(self) -> str:
        return f"ArraySource(num_records={len(self)}, image_shape={self.images.shape[1:]})"


class LabelNoise(NamedTuple):
    """The result of :func:`symmetric_label_noise`: the new source and what was flipped."""

    source: ArraySource
    flipped_ids: np.ndarray  # int64, sorted record indices whose label was changed
    noisy_labels: np.ndarray  # the label each of ``flipped_ids`` now carries
    clean_labels: np.ndarray  # the label it had


def symmetric_label_noise(
    source: ArraySource, rate: float, num_classes: int, seed: int
) -> LabelNoise:
    """Flips ``round(rate · N)`` training labels, each to a uniformly drawn *other* class.

    Symmetric label noise as in the noisy-label experiments of Foret et al.
    2021 (Sec. 4, CIFAR-10 with 20–80 % of the labels corrupted): the flipped
    examples are a uniformly random subset of exactly ``round(rate · N)``
    records, and each gets a class drawn uniformly from the ``num_classes − 1``
    wrong ones (so every flip really changes the label). The draw depends only
    on ``seed`` and the labels, never on the training seed: every method and
    every training seed sees the same corrupted set. Images, record indices
    (the SAF ids) and the test set are untouched.

    Args:
      source: an in-memory training source (``make_source(..., in_memory=True)``).
      rate: fraction of labels to flip, in ``[0, 1)``.
      num_classes: number of classes; labels must lie in ``[0, num_classes)``.
      seed: seed of the flip set.

    Returns:
      A :class:`LabelNoise` with the new source and the flip set.

    Example:
      >>> import numpy as np
      >>> from experiments import input_pipeline
      >>> src = input_pipeline.ArraySource(np.zeros((10, 2)), np.arange(10) % 5)
      >>> noisy = input_pipeline.symmetric_label_noise(src, 0.3, 5, seed=0)
      >>> len(noisy.flipped_ids), bool(np.all(noisy.noisy_labels != noisy.clean_labels))
      (3, True)
    """
    if not isinstance(source, ArraySource):
        raise TypeError(
            f"label noise needs an in-memory ArraySource (make_source(..., in_memory=True)), "
            f"got {type(source).__name__}."
        )
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate!r}.")
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}.")
    labels = np.asarray(source.labels).astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]."
        )
    rng = np.random.default_rng(seed)
    n_flip = int(round(rate * labels.size))
    ids = np.sort(rng.permutation(labels.size)[:n_flip])
    clean = labels[ids]
    noisy = (clean + rng.integers(1, num_classes, size=n_flip)) % num_classes
    new_labels = labels.copy()
    new_labels[ids] = noisy
    noisy_source = ArraySource(source.images, new_labels.astype(source.labels.dtype))
    return LabelNoise(noisy_source, ids, noisy, clean)


def default_cache_dir() -> str:
    """``$SHARPAX_CACHE_DIR`` if set, else ``~/.cache/sharpax``."""
    return os.environ.get(
        "SHARPAX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "sharpax")
    )


def load_mnist1d(cache_dir: str | os.PathLike | None = None, **overrides: Any) -> dict[str, Any]:
    """Builds MNIST-1D offline with the ``mnist1d`` package, cached on disk after the first build.

    The dataset is generated by ``mnist1d.data.make_dataset`` from
    ``get_dataset_args()`` (never the package's download path) and saved as
    ``<cache_dir>/mnist1d_<seed>_<hash of the arguments>.npz``; later calls with
    the same arguments load that file. The global ``random``/``numpy`` RNG
    states, which ``make_dataset`` reseeds, are restored afterwards.

    Args:
      cache_dir: folder of the cache file (default :func:`default_cache_dir`).
      **overrides: fields of ``get_dataset_args()`` to change, e.g.
        ``num_samples=500`` or ``seed=0`` (defaults: 5000 samples, 80% train,
        seed 42, length 40).

    Returns:
      ``{'x': float32 (N_train, L), 'y': int32 (N_train,), 'x_test', 'y_test'}``.
    """
    from mnist1d import data as mnist1d_data  # Lazy: only needed for this dataset.

    args = mnist1d_data.get_dataset_args(as_dict=True)
    unknown = sorted(set(overrides) - set(args) - {"url"})
    if unknown:
        raise ValueError(f"unknown mnist1d arguments {unknown}; known: {sorted(args)}.")
    args.update(overrides)
    args.pop("url", None)
    key = hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()[:10]
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    path = os.path.join(cache_dir, f"mnist1d_{args['seed']}_{key}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        raw = mnist1d_data.make_dataset(_ObjectView(args))
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    data = {
        "x": raw["x"].astype(np.float32),
        "y": raw["y"].astype(np.int32),
        "x_test": raw["x_test"].astype(np.float32),
        "y_test": raw["y_test"].astype(np.int32),
    }
    os.makedirs(cache_dir, exist_ok=True)
    # Write to a temporary file and rename, so concurrent builders never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **data, args=json.dumps(args, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return data


class _ObjectView:
    """Attribute access to a dict, as ``mnist1d.utils.ObjectView``."""

    def __init__(self, d: Mapping[str, Any]):
        self.__dict__ = dict(d)


def make_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    mnist1d_args: Mapping[str, Any] | None = None,
    download: bool = False,
    in_memory: bool = False,
    num_threads: int = 8,
) -> RandomAccessSource:
    """Random-access source of one split of dataset ``name``.

    Args:
      name: one of :data:`DATASET_NAMES`.
      split: a TFDS split (``'train'``, ``'test'``, ``'validation'``, or a
        slice such as ``'train[:90%]'``); ``'train'`` or ``'test'`` for mnist1d.
      data_dir: TFDS data_dir holding the dataset prepared as array_record
        (ignored for mnist1d).
      cache_dir: mnist1d only: cache folder (default :func:`default_cache_dir`).
      mnist1d_args: mnist1d only: overrides of ``get_dataset_args()``.
      download: let TFDS download and prepare a missing dataset (off by default:
        training never touches the network).
      in_memory: read and decode the whole split once, with ``num_threads``
        threads, into an :class:`ArraySource` (images uint8, same record
        indices). Recommended for CIFAR and MNIST (CIFAR train: 150 MB), whose
        per-epoch PNG decoding otherwise costs more than the augmentation; not
        available for ImageNet.
      num_threads: threads used by ``in_memory`` loading.

    Returns:
      A source with ``len()`` and ``source[i] -> {'image', 'label', ...}``.
      ImageNet images are left JPEG-encoded (bytes) and decoded with PIL in the
      preprocessing, so a crop is decoded once.
    """
    _check_name(name)
    if name == "mnist1d":
        if split not in ("train", "test"):
            raise ValueError(f"mnist1d splits are 'train' and 'test', got {split!r}.")
        data = load_mnist1d(cache_dir, **dict(mnist1d_args or {}))
        if split == "train":
            return ArraySource(data["x"], data["y"])
        return ArraySource(data["x_test"], data["y_test"])

    import tensorflow_datasets as tfds  # Lazy, and imports no TensorFlow for data_source.

    if in_memory and name == "imagenet2012":
        raise ValueError("in_memory=True is not supported for imagenet2012 (too large).")
    decoders = {"image": tfds.decode.SkipDecoding()} if name == "imagenet2012" else None
    try:
        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else os.fspath(data_dir),
            decoders=decoders,
            download=download,
        )
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
        raise ValueError(
            f"could not open {name!r} split {split!r} as a TFDS random-access source in "
            f"data_dir={data_dir!r}: prepare it with file_format='array_record' "
            f"(e.g. `tfds build {name} --file_format=array_record --data_dir=...`). "
            f"TFDS said: {e}"
        ) from e
    return to_array_source(source, num_threads) if in_memory else source


def to_array_source(source: RandomAccessSource, num_threads: int = 8) -> ArraySource:
    """Reads every record of ``source`` (in index order) into an in-memory :class:`ArraySource`.

    Only ``'image'`` and ``'label'`` are kept; record ``i`` stays record ``i``,
    so example ids are unchanged.
    """
    num_threads = _check_int("num_threads", num_threads, 1)
    n = len(source)
    if n == 0:
        raise ValueError("cannot load an empty source in memory.")

    def read(i: int) -> tuple[np.ndarray, int]:
        record = source[i]
        return np.asarray(record["image"]), int(record["label"])

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        records = list(pool.map(read, range(n)))
    images = np.stack([r[0] for r in records])
    labels = np.asarray([r[1] for r in records], np.int64)
    return ArraySource(images, labels)


# --------------------------------------------------------------------------------------------------
# Preprocessing and augmentation: (record, rng) -> float32 image.
#
# NumPy on the host, per record, in grain's worker threads, not dm-pix on the accelerator:
# the augmentation then overlaps the device's step instead of adding to it, the PRNG stream
# is per record (a resumed or re-sharded run augments every example exactly as before), and
# the ops are torchvision's exactly (zero padding, then crop; dm-pix 0.4's random_crop does
# not pad, and its random flip makes one decision per call, so per-example flips need a vmap
# over keys). Nothing here needs to run on the device.
# --------------------------------------------------------------------------------------------------


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 ``[0, 255]`` image -> float32 ``(image / 255 - mean) / std`` per channel."""
    scale = np.float32(1.0) / (np.float32(255.0) * np.asarray(std, np.float32))
    offset = np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    return np.asarray(image, np.float32) * scale - offset


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Zero-pads by ``padding`` pixels, takes a random crop of the original size, flips with p=1/2.

    The CIFAR augmentation of the SAM, SAF and vSAM papers (torchvision's
    ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip``): the crop's top-left
    corner in the padded image is uniform in ``[0, 2 * padding]^2``.
    """
    h, w = image.shape[:2]
    dy, dx = rng.integers(0, 2 * padding + 1, size=2)
    # Crop window in the unpadded image's coordinates; what falls outside stays zero.
    y0, x0 = int(dy) - padding, int(dx) - padding
    sy0, sy1 = max(y0, 0), min(y0 + h, h)
    sx0, sx1 = max(x0, 0), min(x0 + w, w)
    out = np.zeros_like(image)
    out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def cutout(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Zeroes a ``size`` x ``size`` square at a uniformly random centre (clipped at the border).

    Applied after normalisation, so the square is the dataset mean (DeVries &
    Taylor 2017, `Improved Regularization of CNNs with Cutout
    <https://arxiv.org/abs/1708.04552>`_).
    """
    h, w = image.shape[:2]
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = max(cy - size // 2, 0), min(cy + size - size // 2, h)
    x0, x1 = max(cx - size // 2, 0), min(cx + size - size // 2, w)
    out = image.copy()
    out[y0:y1, x0:x1] = 0
    return out


def _pil_image(image: Any):
    from PIL import Image  # Lazy: only ImageNet needs PIL.

    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image)).convert("RGB")
    return Image.fromarray(np.asarray(image, np.uint8))


def inception_crop(
    image: Any,
    rng: np.random.Generator,
    size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> np.ndarray:
    """Random-area, random-aspect crop resized to ``size`` x ``size``, flipped with p=1/2.

    Torchvision's ``RandomResizedCrop`` (Szegedy et al. 2015) + horizontal flip:
    up to ``attempts`` tries to sample a crop with area fraction in
    ``area_range`` and log-uniform aspect ratio in ``aspect_range``; falls back
    to a central crop. ``image`` is an encoded image (bytes) or a uint8 array.
    """
    from PIL import Image

    img = _pil_image(image)
    width, height = img.size
    area = width * height
    box = None
    log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
    for _ in range(attempts):
        target = area * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            box = (x, y, x + w, y + h)
            break
    if box is None:  # Central crop at the clamped aspect ratio.
        ratio = width / height
        if ratio < aspect_range[0]:
            w, h = width, round(width / aspect_range[0])
        elif ratio > aspect_range[1]:
            h, w = height, round(height * aspect_range[1])
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
        box = (x, y, x + w, y + h)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box), np.uint8)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def resize_center_crop(image: Any, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resizes the shorter side to ``size / crop_fraction`` (256 for 224), then center-crops."""
    from PIL import Image

    img = _pil_image(image)
    width, height = img.size
    short = round(size / crop_fraction)
    scale = short / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    img = img.resize((new_w, new_h), Image.BILINEAR)
    x, y = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((x, y, x + size, y + size)), np.uint8)


def get_preprocess(
    name: str,
    *,
    train: bool,
    cutout_size: int = 0,
    cutout_prob: float = 1.0,
    crop_padding: int = 4,
    image_size: int = 224,
) -> Preprocess:
    """The preprocessing of dataset ``name``: ``fn(record, rng) -> float32 image``.

    * cifar10/cifar100: train: pad-``crop_padding`` random crop + horizontal
      flip (+ cutout of side ``cutout_size`` if > 0); then per-channel
      normalisation. Eval: normalisation only.
    * imagenet2012: train: inception crop to ``image_size`` + flip; eval:
      resize to ``image_size / 0.875`` + center crop; both normalised.
    * mnist: ``(x / 255 - 0.1307) / 0.3081``, no augmentation.
    * mnist1d: the (already standardised) signal as float32.

    Args:
      name: one of :data:`DATASET_NAMES`.
      train: training (augmented) or evaluation preprocessing.
      cutout_size: CIFAR only: side of the cutout square (0: no cutout).
      cutout_prob: CIFAR only: probability of applying the cutout to an image
        (the vSAM authors' ``Cutout(size=16, p=0.5)``); at 1 no extra random
        number is drawn.
      crop_padding: CIFAR only: padding of the random crop.
      image_size: ImageNet only: output side.

    Returns:
      A function of a record and a ``numpy.random.Generator``; it draws all its
      randomness from that generator (the pipeline seeds it per example).
    """
    _check_name(name)
    if not 0.0 <= cutout_prob <= 1.0:
        raise ValueError(f"cutout_prob must be in [0, 1], got {cutout_prob!r}.")
    if cutout_size < 0 or crop_padding < 0:
        raise ValueError(
            f"cutout_size and crop_padding must be >= 0, got {cutout_size}, {crop_padding}."
        )
    if name in ("cifar10", "cifar100"):
        mean, std = (
            (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        )

        def cifar(record: Record, rng: np.random.Generator) -> np.ndarray:
            image = np.asarray(record["image"])
            if train:
                image = random_crop_flip(image, rng, crop_padding)
            x = normalize(image, mean, std)
            if train and cutout_size and (cutout_prob == 1.0 or rng.random() < cutout_prob):
                x = cutout(x, rng, cutout_size)
            return x

        cifar.uses_rng = train
        return cifar
    if name == "imagenet2012":

        def imagenet(record: Record, rng: np.random.Generator) -> np.ndarray:
            if train:
                image = inception_crop(record["image"], rng, image_size)
            else:
                image = resize_center_crop(record["image"], image_size)
            return normalize(image, IMAGENET_MEAN, IMAGENET_STD)

        imagenet.uses_rng = train
        return imagenet
    if name == "mnist":

        def mnist(record: Record, rng: np.random.Generator) -> np.ndarray:
            del rng
            return normalize(record["image"], MNIST_MEAN, MNIST_STD)

        mnist.uses_rng = False
        return mnist

    def mnist1d(record: Record, rng: np.random.Generator) -> np.ndarray:
        del rng
        return np.asarray(record["image"], np.float32)

    mnist1d.uses_rng = False
    return mnist1d


def _as_float32(record: Record, rng: np.random.Generator) -> np.ndarray:
    del rng
    return np.asarray(record["image"], np.float32)


_as_float32.uses_rng = False


def _rng_for(preprocess: Preprocess, seed: int, epoch: int, example_id: int):
    """``example_rng(...)``, or None for a preprocess marked ``uses_rng = False``.

    Building a ``numpy`` Generator per example costs more than the whole
    preprocessing of MNIST-1D; the ones here that draw nothing say so.
    """
    if getattr(preprocess, "uses_rng", True):
        return example_rng(seed, epoch, example_id)
    return None


# --------------------------------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------------------------------

# Distinct first words of the SeedSequence entropy of each random stream.
_SHUFFLE_STREAM = 0x5348
_AUGMENT_STREAM = 0x4155


# Small sources: the epoch's permutation as an array, cached, so that several runs of the
# same seed in one process (compare's methods) read grain's shuffle once per epoch.
_CACHED_PERMUTATION_MAX_EXAMPLES = 200_000


@functools.lru_cache(maxsize=64)
def _cached_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    shuffled = grain.MapDataset.range(n).shuffle(seed=_epoch_shuffle_seed(seed, epoch))
    out = np.fromiter((shuffled[i] for i in range(n)), np.int64, count=n)
    out.flags.writeable = False
    return out


def _epoch_permutation(n: int, seed: int, epoch: int):
    """Position -> record index of the epoch: grain's global shuffle seeded by ``(seed, epoch)``."""
    if n <= _CACHED_PERMUTATION_MAX_EXAMPLES:
        return _cached_permutation(n, seed, epoch)
    return grain.MapDataset.range(n).shuffle(seed=_epoch_shuffle_seed(seed, epoch))


def _epoch_shuffle_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([_SHUFFLE_STREAM, seed, epoch]).generate_state(1)
    return int(state[0])


def example_rng(seed: int, epoch: int, example_id: int) -> np.random.Generator:
    """The generator an example's augmentation draws from in ``epoch`` (a function of its id only)."""
    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, example_id])


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


def _process_layout(
    batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """Validates and returns (process_index, process_count, per-process batch size)."""
    batch_size = _check_int("batch_size", batch_size, 1)
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    count = _check_int("process_count", count, 1)
    index = _check_int("process_index", index, 0)
    if index >= count:
        raise ValueError(f"process_index ({index}) must be < process_count ({count}).")
    if batch_size % count:
        raise ValueError(
            f"the global batch_size ({batch_size}) must be divisible by process_count ({count})."
        )
    return index, count, batch_size // count


def _collate(examples: Sequence[dict[str, Any]]) -> Batch:
    batch = {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.asarray([e["label"] for e in examples], np.int32),
        "id": np.asarray([e["id"] for e in examples], np.int32),
    }
    if "mask" in examples[0]:
        batch["mask"] = np.asarray([e["mask"] for e in examples], bool)
    return batch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps in one epoch: ``num_examples // batch_size`` (the remainder is dropped)."""
    return _check_int("num_examples", num_examples, 0) // _check_int("batch_size", batch_size, 1)


def num_eval_steps(num_examples: int, batch_size: int) -> int:
    """Eval steps covering every example once: ``ceil(num_examples / batch_size)``."""
    return -(
        -_check_int("num_examples", num_examples, 0) // _check_int("batch_size", batch_size, 1)
    )


def train_dataset(
    source: RandomAccessSource,
    epoch: int,
    batch_size: int,
    seed: int,
    *,
    preprocess: Preprocess | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """One training epoch as a random-access ``grain.MapDataset`` of this process's batches.

    Element ``s`` is step ``s`` of the epoch (``len`` is
    :func:`steps_per_epoch`), so ``dataset[s:]`` resumes from step ``s``.
    Same arguments as :func:`train_batches`.
    """
    epoch = _check_int("epoch", epoch, 0)
    seed = _check_int("seed", seed, 0)
    index, _, local = _process_layout(batch_size, process_index, process_count)
    n = len(source)
    steps = n // batch_size
    if steps == 0:
        raise ValueError(f"batch_size ({batch_size}) is larger than the source ({n} examples).")
    preprocess = preprocess or _as_float32
    permutation = _epoch_permutation(n, seed, epoch)

    def global_id(j: int) -> int:
        step, k = divmod(j, local)
        return int(permutation[step * batch_size + index * local + k])


    def load(example_id: int) -> dict[str, Any]:
        record = source[example_id]
        image = preprocess(record, _rng_for(preprocess, seed, epoch, example_id))
        return {"image": image, "label": record["label"], "id": example_id}

    return (
        grain.MapDataset.range(steps * local)
        .map(global_id)
        .map(load)
        .batch(local, drop_remainder=True, batch_fn=_collate)
    )


def eval_dataset(
    source: RandomAccessSource,
    batch_size: int,
    *,
    preprocess: Preprocess | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.MapDataset:
    """The eval split in order as a random-access ``grain.MapDataset`` of this process's batches.

    ``len`` is :func:`num_eval_steps`; the last global batch is padded (see
    :func:`eval_batches`). Same arguments as :func:`eval_batches`.
    """
    index, _, local = _process_layout(batch_size, process_index, process_count)
    n = len(source)
    steps = num_eval_steps(n, batch_size)
    preprocess = preprocess or _as_float32

    def load(j: int) -> dict[str, Any]:
        step, k = divmod(j, local)
        example_id = step * batch_size + index * local + k
        if example_id < n:
            record = source[example_id]
            image = preprocess(record, _rng_for(preprocess, 0, 0, example_id))
            return {"image": image, "label": record["label"], "id": example_id, "mask": True}
        # Padding: shaped like a real example, but zero and masked out.
        image = preprocess(source[0], _rng_for(preprocess, 0, 0, 0))
        return {"image": np.zeros_like(image), "label": 0, "id": -1, "mask": False}

    return grain.MapDataset.range(steps * local).map(load).batch(local, batch_fn=_collate)


def _iterate(
    dataset: grain.MapDataset, start_step: int, num_threads: int, prefetch_buffer_size: int
) -> Iterator[Batch]:
    start_step = _check_int("start_step", start_step, 0)
    if start_step > len(dataset):
        raise ValueError(
            f"start_step ({start_step}) is past the end of the epoch ({len(dataset)} steps)."
        )
    num_threads = _check_int("num_threads", num_threads, 0)
    prefetch_buffer_size = _check_int("prefetch_buffer_size", prefetch_buffer_size, 1)
    dataset = dataset[start_step:]
    if num_threads == 0:
        return (dataset[i] for i in range(len(dataset)))
    read_options = grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
    )
    return iter(dataset.to_iter_dataset(read_options))


def train_batches(
    source: RandomAccessSource,
    epoch: int,
    batch_size: int,
    seed: int,
    *,
    preprocess: Preprocess | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 4,
) -> Iterator[Batch]:
    """Iterates over this process's batches of one training epoch, from ``start_step``.

    The epoch's order is a grain shuffle of the record indices seeded by
    ``(seed, epoch)``; example ``i``'s augmentation uses
    :func:`example_rng` ``(seed, epoch, i)``. Batches are therefore identical
    across runs, prefetch settings and resumes.

    Args:
      source: random-access source (:func:`make_source`).
      epoch: epoch number (>= 0); each epoch has its own order and augmentation.
      batch_size: GLOBAL batch size, divisible by ``process_count``; this
        process yields ``batch_size // process_count`` examples per step.
      seed: base seed (>= 0).
      preprocess: ``fn(record, rng) -> float32 image`` (:func:`get_preprocess`);
        default: the record's image cast to float32.
      start_step: first step to yield (to resume mid-epoch).
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      num_threads: 0 to build batches in the caller's thread; otherwise grain
        builds them in this many background threads (order is preserved).
      prefetch_buffer_size: batches prefetched when ``num_threads > 0``.

    Returns:
      An iterator over :func:`steps_per_epoch` ``- start_step`` batches
      ``{'image': float32, 'label': int32, 'id': int32}``; ``id`` is the global
      record index.

    Example:
      >>> import numpy as np
      >>> from experiments import input_pipeline as ip
      >>> source = ip.ArraySource(np.zeros((10, 2)), np.arange(10))
      >>> batches = list(ip.train_batches(source, 0, 4, seed=0))
      >>> len(batches), batches[0]['image'].shape, batches[0]['id'].dtype
      (2, (4, 2), dtype('int32'))
      >>> bool(np.all(batches[0]['id'] == batches[0]['label']))
      True
    """
    dataset = train_dataset(
        source,
        epoch,
        batch_size,
        seed,
        preprocess=preprocess,
        process_index=process_index,
        process_count=process_count,
    )
    return _iterate(dataset, start_step, num_threads, prefetch_buffer_size)


def eval_batches(
    source: RandomAccessSource,
    batch_size: int,
    *,
    preprocess: Preprocess | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_threads: int = 0,
    prefetch_buffer_size: int = 4,
) -> Iterator[Batch]:
    """Iterates over this process's eval batches: every example exactly once, in record order.

    The last global batch is padded to ``batch_size``; padding rows have
    ``mask=False``, ``id=-1``, ``label=0`` and a zero image. Weight per-example
    metrics by ``mask`` and sum over all batches (and processes) to count every
    example once.

    Args:
      source: random-access source (:func:`make_source`).
      batch_size: GLOBAL batch size, divisible by ``process_count``.
      preprocess: ``fn(record, rng) -> float32 image``, e.g.
        ``get_preprocess(name, train=False)``.
      start_step: first step to yield.
      process_index: this process (default ``jax.process_index()``).
      process_count: number of processes (default ``jax.process_count()``).
      num_threads: background threads (0: none).
      prefetch_buffer_size: batches prefetched when ``num_threads > 0``.

    Returns:
      An iterator over :func:`num_eval_steps` batches
      ``{'image', 'label', 'id', 'mask'}``.
    """
    dataset = eval_dataset(
        source,
        batch_size,
        preprocess=preprocess,
        process_index=process_index,
        process_count=process_count,
    )
    return _iterate(dataset, start_step, num_threads, prefetch_buffer_size)
