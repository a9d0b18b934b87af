"""Input pipeline: deterministic, resumable streams of images in [-1, 1] (x / 127.5 - 1).

Determinism and resume. Each process reads a disjoint shard of n examples in a fixed order
(TFDS `even_splits`; TFRecord files or records, and image files, dealt round robin). Its example
stream is the concatenation over epochs e = 0, 1, ... of the shard shuffled with seeds derived
statelessly from (training.seed, process_index, e): a full shuffle when n <= data.shuffle_buffer
or for image folders (whose file list is shuffled), else a `shuffle(data.shuffle_buffer)` after
the fixed read order (TFRecord files are also reordered per epoch). The horizontal flip of the
element at position p of epoch e is a stateless draw keyed by (seed, process_index, e, p).

The batch of step s holds stream elements [s * b, (s + 1) * b), b the per-process batch, so the
stream is a pure function of (seed, process_index, process_count, step): `start_step=s` starts
at epoch (s * b) // n and skips (s * b) % n elements of it. Resuming reads at most one epoch,
never s batches, and yields exactly the batches an uninterrupted run would have seen. tf.data
runs with `deterministic` options; `Dataset.shuffle` also mixes in TF's global seed, which
ddpm_jax never sets.

Labels. Every source reads (image, label) pairs, label -1 where it has none, and the label rides
with its image through the shuffle, flip, sharding and resume; `create_train_dataset` drops them
unless `labels=True`, so both streams hold the same images in the same order. Labels are TFDS's
`label` feature (cifar10, the digits) and an image folder's class sub-folders (see
`image_folder`); StyleGAN TFRecords and TFDS datasets without `label` (celeb_a_hq, lsun) have none.

Resizing: images are center-cropped to a square and, if their size differs, resized to
`data.image_size` with bilinear interpolation and antialiasing (area-like when shrinking), then
rounded back to integers 0..255, so every pixel is a uint8 value before x / 127.5 - 1 (digits
are upsampled 8 -> image_size this way). Channels are converted to `data.num_channels`
(RGB <-> grayscale).
"""

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from ddpm_jax.data import (
  digits_tfds,  # noqa: F401 - registers the digits' TFDS builder.
  image_folder,
  lsun_tfrecords,
)
from ddpm_jax.data.specs import DATASETS, DatasetSpec


def _hide_accelerators_from_tensorflow() -> None:
  """Keeps tf.data on the CPU so it never takes GPU/TPU memory from JAX."""
  for kind in ("GPU", "TPU"):
    with contextlib.suppress(RuntimeError, ValueError):
      tf.config.set_visible_devices([], kind)


_hide_accelerators_from_tensorflow()


class DatasetNotPreparedError(ValueError):
  """The configured dataset is not on disk; the message says where it looked and what to run."""


class LabelsError(ValueError):
  """A class-conditional model (model.num_classes > 0) and the dataset's labels do not fit."""


NO_LABEL = -1  # The label of an image whose dataset has none.


@dataclasses.dataclass(frozen=True)
class _Shard:
  """One process's part of a split.

  `read(seed)` gives its (uint8 image [h, w, c], int32 label []) pairs, label NO_LABEL when
  `num_classes` is 0: in a fixed order for seed None, else in the epoch order for that int64
  scalar seed (a full shuffle when `fully_shuffled`).
  """

  num_examples: int
  read: Callable[[tf.Tensor | None], tf.data.Dataset]
  fully_shuffled: bool = False
  max_num_examples: int = -1  # Largest shard over processes (eval shards only, else -1).
  num_classes: int = 0  # Of the whole dataset; 0: no labels.


# ----------------------------------------------------------------------------- configuration


def _spec(config: ml_collections.ConfigDict) -> DatasetSpec:
  name = config.data.dataset
  if name not in DATASETS:
    raise ValueError(
      f"Unknown dataset: data.dataset={name!r}. Allowed names: {', '.join(sorted(DATASETS))}."
    )
  return DATASETS[name]


def _source(config: ml_collections.ConfigDict) -> str:
  """Returns how the configured dataset is read: 'tfds', 'tfrecords' or 'folder'."""
  spec = _spec(config)
  if spec.tfds_name is None:
    return "folder"
  if not spec.stylegan_tfrecords:
    return "tfds"
  if config.data.source not in ("tfds", "tfrecords"):
    raise ValueError(
      f"data.source={config.data.source!r} is not valid for {config.data.dataset}: "
      "use 'tfds' or 'tfrecords'."
    )
  return config.data.source


def get_dataset_info(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Returns {'image_shape': (S, S, C), 'num_train_examples', 'num_eval_examples', 'num_classes'}.

  The counts are None when the dataset (or its eval split) is not prepared; the embedded digits
  are prepared on first use. `num_classes` is that of `num_classes(config)`. Raises ValueError
  for an unknown data.dataset or data.source.
  """
  _source(config)  # Config errors must not read as "not prepared".
  counts = {}
  for key, split in (("num_train_examples", None), ("num_eval_examples", config.data.eval_split)):
    try:
      counts[key] = _make_shard(config, split, 0, 1, for_training=split is None).num_examples
    except ValueError:  # Includes DatasetNotPreparedError and TFDS's unknown split.
      counts[key] = None
  size, channels = config.data.image_size, config.data.num_channels
  return {"image_shape": (size, size, channels), **counts, "num_classes": num_classes(config)}


# ----------------------------------------------------------------------------- labels


def _tfds_label_feature(builder) -> tfds.features.ClassLabel | None:
  features = builder.info.features  # A FeaturesDict: no `get`.
  if "label" not in features:
    return None
  return features["label"] if isinstance(features["label"], tfds.features.ClassLabel) else None


def _labels_of(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(number of classes, 0 for none; what the data holds, for messages), from metadata only.

  Raises DatasetNotPreparedError for an image folder without images.
  """
  source = _source(config)
  if source == "tfrecords":
    return 0, "StyleGAN TFRecords hold images only"
  if source == "tfds":
    name = _spec(config).tfds_name
    label = _tfds_label_feature(tfds.builder(name, data_dir=_data_dir(config)))
    if label is None:
      return 0, f"TFDS {name} has no 'label' feature"
    return label.num_classes, f"TFDS {name} has {label.num_classes} classes"
  folder, where = _scan_folder(config), config.data.data_dir
  if folder.labels is None:
    return 0, (
      f"a folder has labels only when every image is in a class sub-folder "
      f"({where.rstrip('/')}/<class>/...), but {where} itself holds {folder.num_top_level_files} "
      "of them"
    )
  names = folder.class_names
  shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
  return len(names), f"{where} has {len(names)} class sub-folders ({shown})"


def num_classes(config: ml_collections.ConfigDict) -> int:
  """The number of classes of the configured dataset's labels; 0 when it has none.

  Cheap: TFDS's features (from the builder's code when the data is not prepared) or the image
  folder's directory listing (0 for a folder without images); no example is read.
  """
  try:
    return _labels_of(config)[0]
  except DatasetNotPreparedError:
    return 0


def check_labels(config: ml_collections.ConfigDict) -> None:
  """Raises LabelsError unless the dataset has labels of exactly `model.num_classes` classes.

  Nothing is checked, or read, for an unconditional model (model.num_classes 0, the default).
  An image folder without images raises DatasetNotPreparedError.
  """
  wanted = config.model.get("num_classes", 0)
  if not wanted:
    return
  have, what = _labels_of(config)
  dataset = config.data.dataset
  if not have:
    raise LabelsError(
      f"model.num_classes={wanted} needs class labels, but dataset {dataset} has none: {what}. "
      "Set --config.model.num_classes=0 to train unconditionally."
    )
  if have != wanted:
    raise LabelsError(
      f"model.num_classes={wanted} does not match dataset {dataset}: {what}. "
      f"Set --config.model.num_classes={have}."
    )


# ----------------------------------------------------------------------------- sources


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
  return config.data.data_dir or None


def _tfds_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  spec = _spec(config)
  builder = tfds.builder(spec.tfds_name, data_dir=_data_dir(config))
  if config.data.dataset == "digits" and not builder.is_prepared():
    builder.download_and_prepare()  # Embedded in scikit-learn: offline and a few seconds.
  return builder


def prepare_embedded_dataset(config: ml_collections.ConfigDict) -> None:
  """Writes the embedded digits into `data.data_dir` if missing; other datasets are untouched.

  Call on every process: they prepare one after the other, since they may share a data dir.
  """
  if config.data.dataset != "digits":
    return
  for index in range(jax.process_count()):
    if index == jax.process_index():
      _tfds_builder(config)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"prepare_embedded_dataset_{index}")


def _tfds_not_prepared(config: ml_collections.ConfigDict, builder) -> DatasetNotPreparedError:
  name = _spec(config).tfds_name
  root = builder.data_dir_root
  command = (
    f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
    f"data_dir='{root}').download_and_prepare()\""
  )
  message = (
    f"Dataset {config.data.dataset} (TFDS {name}) is not prepared: no data in "
    f"{builder.data_dir} (data_dir {root}). Prepare it with:\n  {command}"
  )
  if config.data.dataset == "celeb_a_hq":
    manual_dir = f"{root}/downloads/manual"
    message += (
      f"\nCelebA-HQ needs a manual download first, into the manual_dir {manual_dir}:"
      f"\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
    )
  if _spec(config).stylegan_tfrecords:
    message += (
      "\nOr read StyleGAN TFRecords: --config.data.source=tfrecords "
      "--config.data.data_dir='/path/to/*-r08.tfrecords'."
    )
  return DatasetNotPreparedError(message)


def _tfds_dataset(config: ml_collections.ConfigDict, builder, split) -> tf.data.Dataset:
  """Reads `split` in its stored order (deterministic): (image, int32 label or NO_LABEL)."""
  read_config = tfds.ReadConfig(options=_options(), try_autocache=True)
  try:
    ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  except (AssertionError, FileNotFoundError) as e:  # TFDS asserts that the data exists.
    raise _tfds_not_prepared(config, builder) from e
  has_label = _tfds_label_feature(builder) is not None

  def image_and_label(example):
    label = tf.cast(example["label"], tf.int32) if has_label else tf.constant(NO_LABEL)
    return example["image"], label

  return ds.map(image_and_label, num_parallel_calls=tf.data.AUTOTUNE)


def _tfds_count(config, builder, split) -> int:
  """Number of examples of `split` (metadata, or the dataset's cardinality when mocked)."""
  if builder.info.splits:
    return builder.info.splits[split].num_examples
  return int(_tfds_dataset(config, builder, split).cardinality())


def _tfds_shard(config, split, process_index, process_count, for_training) -> _Shard:
  builder = _tfds_builder(config)
  subsplits = tfds.even_splits(split, process_count)
  ds = _tfds_dataset(config, builder, subsplits[process_index])
  n = _tfds_count(config, builder, subsplits[process_index])
  largest = -1 if for_training else max(_tfds_count(config, builder, s) for s in subsplits)
  label = _tfds_label_feature(builder)
  return _Shard(
    n, lambda seed: ds, max_num_examples=largest, num_classes=label.num_classes if label else 0
  )


def _tfrecord_files(config: ml_collections.ConfigDict) -> list[str]:
  pattern = config.data.data_dir
  files = lsun_tfrecords.list_files(pattern) if pattern else []
  if not files:
    raise DatasetNotPreparedError(
      f"Dataset {config.data.dataset} (StyleGAN TFRecords): no file matches data.data_dir="
      f"{pattern!r}. Create the files with StyleGAN's dataset_tool.py, e.g.\n"
      "  python dataset_tool.py create_lsun ~/datasets/lsun-church "
      "~/lsun/church_outdoor_train_lmdb --resolution 256\n"
      "and set --config.data.data_dir='~/datasets/lsun-church/*-r08.tfrecords' (one resolution)."
    )
  return files


def _parse_unlabelled_record(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  return lsun_tfrecords.parse_example(serialized), tf.constant(NO_LABEL)


def _tfrecords_shard(config, process_index, process_count, for_training, num_examples) -> _Shard:
  """Deals files to processes when there are enough of them (training), else records."""
  files = _tfrecord_files(config)
  counts = [lsun_tfrecords.count_records(f) for f in files]
  if for_training and len(files) >= process_count:
    mine = files[process_index::process_count]
    n = sum(counts[process_index::process_count])

    def read(seed):
      names = tf.data.Dataset.from_tensor_slices(mine)
      if seed is not None:
        names = names.shuffle(len(mine), seed=seed, reshuffle_each_iteration=False)
      return names.flat_map(tf.data.TFRecordDataset).map(_parse_unlabelled_record)

    return _Shard(n, read)
  total = sum(counts) if num_examples < 0 else min(num_examples, sum(counts))
  records = tf.data.TFRecordDataset(files).take(total).shard(process_count, process_index)
  n = len(range(process_index, total, process_count))
  read = lambda seed: records.map(_parse_unlabelled_record)
  return _Shard(n, read, max_num_examples=math.ceil(total / process_count))


def _scan_folder(config: ml_collections.ConfigDict) -> image_folder.ImageFolder:
  folder = image_folder.scan(config.data.data_dir)
  if not folder.files:
    raise DatasetNotPreparedError(
      f"Dataset folder: no {'/'.join(image_folder.EXTENSIONS)} images under data.data_dir="
      f"{config.data.data_dir!r} (searched recursively). Set --config.data.data_dir to a folder "
      "of images."
    )
  return folder


def _folder_shard(config, process_index, process_count, num_examples) -> _Shard:
  folder = _scan_folder(config)
  end = num_examples if num_examples >= 0 else None
  files = folder.files[:end]
  labels = (folder.labels or [NO_LABEL] * len(folder.files))[:end]
  mine = files[process_index::process_count]
  my_labels = labels[process_index::process_count]
  channels = config.data.num_channels

  def read(seed):
    examples = tf.data.Dataset.from_tensor_slices(
      (tf.constant(mine, tf.string), tf.constant(my_labels, tf.int32))
    )
    if seed is not None:
      examples = examples.shuffle(len(mine), seed=seed, reshuffle_each_iteration=False)
    return examples.map(
      lambda path, label: (image_folder.read_image(path, channels), label),
      num_parallel_calls=tf.data.AUTOTUNE,
    )

  largest = math.ceil(len(files) / process_count)
  return _Shard(
    len(mine),
    read,
    fully_shuffled=True,
    max_num_examples=largest,
    num_classes=len(folder.class_names),
  )


def _make_shard(config, split, process_index, process_count, for_training, num_examples=-1):
  """This process's shard of `split` (None: the train split) of the configured dataset."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count}).")
  source = _source(config)
  if source == "folder":
    return _folder_shard(config, process_index, process_count, num_examples)
  if source == "tfrecords":
    return _tfrecords_shard(config, process_index, process_count, for_training, num_examples)
  split = split or _spec(config).train_split
  if num_examples >= 0:
    split = f"{split}[:{num_examples}]"
  return _tfds_shard(config, split, process_index, process_count, for_training)


# ----------------------------------------------------------------------------- preprocessing


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _center_crop_resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Float [h, w, c] -> [size, size, c]: central square, bilinear antialiased resize if needed."""
  if tuple(image.shape[:2]) == (size, size):
    return image
  shape = tf.shape(image)
  side = tf.minimum(shape[0], shape[1])
  image = tf.image.crop_to_bounding_box(
    image, (shape[0] - side) // 2, (shape[1] - side) // 2, side, side
  )
  image = tf.cond(
    tf.equal(side, size),
    lambda: image,
    lambda: tf.image.resize(image, [size, size], method="bilinear", antialias=True),
  )
  return tf.ensure_shape(image, [size, size, image.shape[-1]])


def _match_channels(image: tf.Tensor, num_channels: int) -> tf.Tensor:
  """Float [h, w, c] -> [h, w, num_channels] (grayscale <-> RGB)."""
  channels = image.shape[-1]
  if channels is None:  # TFRecords: only known at run time.
    return tf.ensure_shape(image, [None, None, num_channels])
  if channels == num_channels:
    return image
  if (channels, num_channels) == (1, 3):
    return tf.image.grayscale_to_rgb(image)
  if (channels, num_channels) == (3, 1):
    return tf.image.rgb_to_grayscale(image)
  raise ValueError(f"Cannot convert {channels}-channel images to data.num_channels={num_channels}.")


def _to_model_input(image: tf.Tensor, flip: tf.Tensor, config) -> tf.Tensor:
  """uint8 [h, w, c] -> float32 [S, S, C] in [-1, 1], mirrored left-right where `flip`."""
  image = _match_channels(tf.cast(image, tf.float32), config.data.num_channels)
  image = _center_crop_resize(image, config.data.image_size)
  image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
  image = tf.where(flip, tf.reverse(image, axis=[1]), image)
  return image / 127.5 - 1.0


# ----------------------------------------------------------------------------- streams


def _int64_seed(key: tf.Tensor) -> tf.Tensor:
  """A scalar int64 seed for `Dataset.shuffle` from a stateless key [2]."""
  return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def _example_stream(shard: _Shard, key: tf.Tensor, buffer_size: int, start: int):
  """Infinite dataset of (uint8 image, int32 label, flip bool) from element `start` on (see top)."""
  start_epoch, skip = divmod(start, shard.num_examples)
  buffer_size = 0 if shard.fully_shuffled else min(buffer_size, shard.num_examples)

  def one_epoch(epoch):
    epoch_key = tf.random.fold_in(key, epoch, alg="philox")
    examples = shard.read(_int64_seed(tf.random.fold_in(epoch_key, 0, alg="philox")))
    if buffer_size > 1:
      seed = _int64_seed(tf.random.fold_in(epoch_key, 1, alg="philox"))
      examples = examples.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=False)
    skip_here = tf.where(epoch == start_epoch, np.int64(skip), np.int64(0))
    examples = examples.enumerate().skip(skip_here)
    flip_key = tf.random.fold_in(epoch_key, 2, alg="philox")

    def with_flip(position, example):
      u = tf.random.stateless_uniform([], tf.random.fold_in(flip_key, position, alg="philox"))
      return *example, u < 0.5

    return examples.map(with_flip)

  return tf.data.Dataset.counter(start_epoch).flat_map(one_epoch)


def num_data_shards(config: ml_collections.ConfigDict, process_count: int) -> int:
  """`data.num_shards`, or one shard per process when it is 0."""
  return config.data.num_shards or process_count


def create_train_dataset(
  config: ml_collections.ConfigDict,
  *,
  process_index: int,
  process_count: int,
  start_step: int = 0,
  labels: bool = False,
) -> Iterator[np.ndarray] | Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite iterator of float32 batches [b, S, S, C], b = training.batch_size // process_count.

  With `labels=True` it yields (images [b, S, S, C], labels int32 [b]) instead, each label that
  of its image and the images exactly those of `labels=False`; a dataset without labels raises
  LabelsError (`check_labels` says so before anything is built).

  The train split is cut into `num_data_shards` disjoint shards, each with its own stream of
  batch_size // num_shards examples per step; a process reads the consecutive shards
  [i * k, (i + 1) * k), k = num_shards // process_count, and concatenates their batches. The
  global batch of step s therefore depends only on (training.seed, num_shards, s): with a fixed
  `data.num_shards` it is the same for any process count that divides it, and `start_step=s`
  resumes exactly (see the module docstring).
  """
  num_shards = num_data_shards(config, process_count)
  batch = config.training.batch_size
  if num_shards % process_count or batch % num_shards:
    raise ValueError(
      f"data.num_shards={num_shards} must be a multiple of the {process_count} processes and "
      f"divide training.batch_size={batch}."
    )
  per_process = num_shards // process_count
  streams = [
    _shard_batches(config, shard, num_shards, batch // num_shards, start_step, labels)
    for shard in range(process_index * per_process, (process_index + 1) * per_process)
  ]
  ds = streams[0]
  if per_process > 1:
    ds = tf.data.Dataset.zip(tuple(streams)).map(
      lambda *b: tuple(tf.concat(parts, axis=0) for parts in zip(*b, strict=True))
    )
  if not labels:
    ds = ds.map(lambda images, _: images)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(_options())))


def _shard_batches(
  config, shard_index: int, num_shards: int, batch_size: int, start_step: int, labels: bool
) -> tf.data.Dataset:
  """(images [batch_size, S, S, C], labels [batch_size]) of one shard from `start_step` on."""
  shard = _make_shard(config, None, shard_index, num_shards, for_training=True)
  if shard.num_examples == 0:
    raise ValueError(f"Data shard {shard_index} of {num_shards} got no training examples.")
  if labels and not shard.num_classes:
    raise LabelsError(
      f"Dataset {config.data.dataset} has no class labels to yield: {_labels_of(config)[1]}."
    )
  key = tf.constant([config.training.seed, shard_index], tf.int64)
  ds = _example_stream(shard, key, config.data.shuffle_buffer, start_step * batch_size)
  random_flip = bool(config.data.random_flip)
  ds = ds.map(
    lambda image, label, flip: (
      _to_model_input(image, tf.logical_and(flip, random_flip), config),
      label,
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return ds.batch(batch_size, drop_remainder=True)


def create_eval_dataset(
  config: ml_collections.ConfigDict,
  *,
  process_index: int,
  process_count: int,
  batch_size_per_process: int,
  split: str | None = None,
  num_examples: int = -1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One pass over `split` (default data.eval_split; its first `num_examples` if >= 0).

  Yields (images float32 [b, S, S, C] in [-1, 1], mask bool [b]), no flip, no shuffle, each
  process a disjoint part. Batches are padded (mask False) and every process yields the same
  number of batches, so multi-host eval steps stay in lockstep. TFRecords and image folders have
  no splits: `split` is ignored and all their images are read.
  """
  split = split or config.data.eval_split
  shard = _make_shard(
    config, split, process_index, process_count, for_training=False, num_examples=num_examples
  )
  num_batches = math.ceil(shard.max_num_examples / batch_size_per_process)
  size, channels = config.data.image_size, config.data.num_channels
  images = shard.read(None).map(
    lambda image, _: (_to_model_input(image, tf.constant(False), config), tf.constant(True)),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  padding = tf.data.Dataset.from_tensors((tf.zeros([size, size, channels]), tf.constant(False)))
  ds = images.concatenate(padding.repeat()).take(num_batches * batch_size_per_process)
  ds = ds.batch(batch_size_per_process).prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds.with_options(_options())))
