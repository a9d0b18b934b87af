"""Tests of ddpm_jax.data (the pipeline and the datasets) on offline data.

The embedded digits (prepared once per session), `tfds.testing.mock_data` for CIFAR-10, tiny
StyleGAN TFRecords and PNG folders written into tmp_path. Labels are checked against the image
they come with: at 8x8 every train digit (and its mirror image) is distinct, mocked CIFAR-10
images are random, and the test folders' images encode their class in their pixel value.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from ddpm_jax.data import digits, digits_tfds, lsun_tfrecords, pipeline


def make_config(dataset="digits", data_dir="", image_size=16, num_channels=1, batch_size=100):
  config = default.get_config()
  config.data.dataset = dataset
  config.data.data_dir = str(data_dir)
  config.data.image_size = image_size
  config.data.num_channels = num_channels
  config.training.batch_size = batch_size
  return config


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8, asserting they are exactly x / 127.5 - 1 of integers x."""
  values = (images + 1.0) * 127.5
  np.testing.assert_allclose(values, np.round(values), atol=1e-3)
  return np.round(values).astype(np.uint8)


def image_counts(images: np.ndarray) -> collections.Counter:
  return collections.Counter(image.tobytes() for image in to_uint8(images))


def take(iterator, num_batches):
  return [next(iterator) for _ in range(num_batches)]


def eval_images(config, process_index=0, process_count=1, batch_size=128, **kwargs):
  """All unmasked images of one eval pass, [N, H, W, C]."""
  batches = list(
    pipeline.create_eval_dataset(
      config,
      process_index=process_index,
      process_count=process_count,
      batch_size_per_process=batch_size,
      **kwargs,
    )
  )
  return np.concatenate([images[mask] for images, mask in batches])


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  tfds.builder(digits_tfds.DdpmDigits.name, data_dir=str(data_dir)).download_and_prepare()
  return data_dir


# ----------------------------------------------------------------------------- digits builder


def test_digits_builder_matches_sklearn(digits_dir):
  from sklearn.datasets import load_digits

  builder = tfds.builder("ddpm_digits", data_dir=str(digits_dir))
  assert builder.info.splits["train"].num_examples == 1500
  assert builder.info.splits["test"].num_examples == 297
  reference = load_digits()
  expected = np.round(reference.images * 255 / 16).astype(np.uint8)
  for split, start in (("train", 0), ("test", 1500)):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
    images = np.stack([e["image"] for e in examples])
    labels = np.array([e["label"] for e in examples])
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(images[..., 0], expected[start : start + len(images)])
    np.testing.assert_array_equal(labels, reference.target[start : start + len(images)])
  assert images.max() == 255 and images.min() == 0


def test_dataset_info(digits_dir):
  info = pipeline.get_dataset_info(make_config(data_dir=digits_dir))
  assert info == {
    "image_shape": (16, 16, 1),
    "num_train_examples": 1500,
    "num_eval_examples": 297,
    "num_classes": 10,
  }


# ----------------------------------------------------------------------------- train stream


def test_digits_train_batches(digits_dir):
  batch = next(
    pipeline.create_train_dataset(
      make_config(data_dir=digits_dir), process_index=0, process_count=1
    )
  )
  assert batch.shape == (100, 16, 16, 1) and batch.dtype == np.float32
  assert batch.min() == -1.0 and batch.max() == 1.0
  to_uint8(batch)  # Pixels are integers 0..255 mapped by x / 127.5 - 1.


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_is_exact_across_epoch_boundary(digits_dir, process_index, process_count):
  # 100 images per process and step; the shard has 1500 / process_count, so an epoch ends
  # inside step 7 (two processes) or at step 15 (one).
  config = make_config(data_dir=digits_dir, batch_size=100 * process_count)
  kwargs = dict(process_index=process_index, process_count=process_count)
  steps = 1500 // process_count // 100 + 2
  straight = take(pipeline.create_train_dataset(config, **kwargs), steps)
  for start in (steps - 3, steps - 2):
    resumed = take(pipeline.create_train_dataset(config, start_step=start, **kwargs), 2)
    for step, batch in enumerate(resumed, start):
      np.testing.assert_array_equal(batch, straight[step])
  assert not np.array_equal(straight[-1], straight[-2])


def test_epochs_are_different_shuffles_of_the_shard(digits_dir):
  config = make_config(data_dir=digits_dir, batch_size=500)
  config.data.random_flip = False
  batches = take(pipeline.create_train_dataset(config, process_index=0, process_count=1), 6)
  first, second = np.concatenate(batches[:3]), np.concatenate(batches[3:])
  assert image_counts(first) == image_counts(second)  # Every example once per epoch.
  assert not np.array_equal(first, second)


def test_flip_is_random_and_deterministic(digits_dir):
  config = make_config(data_dir=digits_dir, batch_size=500)
  kwargs = dict(process_index=0, process_count=1)
  flipped = next(pipeline.create_train_dataset(config, **kwargs))
  np.testing.assert_array_equal(flipped, next(pipeline.create_train_dataset(config, **kwargs)))
  config.data.random_flip = False
  plain = next(pipeline.create_train_dataset(config, **kwargs))
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)  # Flips never change the order.
  num_flipped = np.sum(mirrored & ~same)
  assert 150 < num_flipped < 350, num_flipped


def test_processes_read_disjoint_parts_covering_the_split(digits_dir):
  config = make_config(data_dir=digits_dir, batch_size=500)
  config.data.random_flip = False
  everything = image_counts(eval_images(config, split="train"))
  assert sum(everything.values()) == 1500
  parts = []
  for process_index in range(2):
    # 3 steps of 250 = one epoch of this process's 750 examples.
    stream = pipeline.create_train_dataset(config, process_index=process_index, process_count=2)
    parts.append(image_counts(np.concatenate(take(stream, 3))))
  assert parts[0] + parts[1] == everything
  assert sum((parts[0] & parts[1]).values()) < 20  # Only the few duplicate digits of sklearn.


def test_fixed_num_shards_gives_the_same_global_batches_for_any_process_count(digits_dir):
  config = make_config(data_dir=digits_dir, batch_size=8)
  config.data.num_shards = 4
  config.data.random_flip = True
  one = take(pipeline.create_train_dataset(config, process_index=0, process_count=1), 3)
  for process_count in (2, 4):
    parts = [
      take(
        pipeline.create_train_dataset(
          config, process_index=i, process_count=process_count, start_step=1
        ),
        2,
      )
      for i in range(process_count)
    ]
    for step in range(2):
      np.testing.assert_array_equal(np.concatenate([p[step] for p in parts]), one[step + 1])
  # Shards are disjoint: the 4 quarters of a global batch come from different examples.
  assert len(image_counts(np.concatenate(one))) > 20


def test_eval_is_padded_disjoint_and_in_lockstep(digits_dir):
  config = make_config(data_dir=digits_dir)
  kwargs = dict(process_count=2, batch_size_per_process=64)
  runs = [list(pipeline.create_eval_dataset(config, process_index=i, **kwargs)) for i in range(2)]
  assert [len(r) for r in runs] == [3, 3]  # 149 and 148 examples: 3 batches of 64 each.
  for images, mask in runs[0]:
    assert images.shape == (64, 16, 16, 1) and images.dtype == np.float32 and mask.dtype == bool
  masks = [np.concatenate([m for _, m in r]) for r in runs]
  assert [m.sum() for m in masks] == [149, 148] and not masks[0][-1]
  union = image_counts(np.concatenate([im[m] for r in runs for im, m in r]))
  assert union == image_counts(eval_images(config))
  first = eval_images(config, num_examples=10)
  np.testing.assert_array_equal(first, eval_images(config)[:10])


# ----------------------------------------------------------------------------- CIFAR-10 (mocked)


def test_cifar10_through_mock_data(tmp_path):
  config = make_config("cifar10", tmp_path, image_size=32, num_channels=3, batch_size=8)
  kwargs = dict(process_index=0, process_count=1)
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    straight = take(pipeline.create_train_dataset(config, **kwargs), 4)
    resumed = take(pipeline.create_train_dataset(config, start_step=2, **kwargs), 2)
    eval_batches = list(pipeline.create_eval_dataset(config, batch_size_per_process=8, **kwargs))
  for batch in straight:
    assert batch.shape == (8, 32, 32, 3) and batch.dtype == np.float32
    assert batch.min() >= -1.0 and batch.max() <= 1.0
  np.testing.assert_array_equal(np.stack(resumed), np.stack(straight[2:]))
  assert len(eval_batches) == 3 and sum(m.sum() for _, m in eval_batches) == 20


# ----------------------------------------------------------------------------- TFRecords


def write_stylegan_file(path, images_chw):
  """Writes records exactly as StyleGAN's TFRecordExporter does (independent of the package)."""
  with tf.io.TFRecordWriter(str(path)) as writer:
    for image in images_chw:
      feature = {
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=image.shape)),
        "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
      }
      example = tf.train.Example(features=tf.train.Features(feature=feature))
      writer.write(example.SerializeToString())


def test_stylegan_tfrecords_are_read_exactly(tmp_path):
  rng = np.random.default_rng(0)
  chw = rng.integers(0, 256, size=(9, 3, 8, 8), dtype=np.uint8)
  write_stylegan_file(tmp_path / "lsun-r03-a.tfrecords", chw[:5])
  write_stylegan_file(tmp_path / "lsun-r03-b.tfrecords", chw[5:])
  expected = chw.transpose(0, 2, 3, 1).astype(np.float32) / 127.5 - 1.0
  config = make_config("lsun_church", tmp_path / "*.tfrecords", image_size=8, num_channels=3)
  config.data.source = "tfrecords"
  config.data.random_flip = False
  np.testing.assert_array_equal(eval_images(config, batch_size=4), expected)
  halves = [eval_images(config, i, 2, batch_size=4) for i in range(2)]
  assert image_counts(np.concatenate(halves)) == image_counts(expected)
  # Training with 2 processes deals the files: process 0 reads exactly file a per epoch.
  config.training.batch_size = 10
  stream = pipeline.create_train_dataset(config, process_index=0, process_count=2)
  assert image_counts(next(stream)) == image_counts(expected[:5])
  assert [lsun_tfrecords.count_records(str(f)) for f in sorted(tmp_path.iterdir())] == [5, 4]


def test_count_records_of_unequal_records(tmp_path):
  path = tmp_path / "mixed.tfrecords"
  images = [np.zeros((3, s, s), np.uint8) for s in (4, 4, 5, 4, 6, 4)]
  write_stylegan_file(path, images)
  assert lsun_tfrecords.count_records(str(path)) == 6


def test_package_writer_round_trips(tmp_path):
  images = np.random.default_rng(1).integers(0, 256, size=(3, 4, 6, 3), dtype=np.uint8)
  lsun_tfrecords.write_tfrecords(str(tmp_path / "x.tfrecords"), images)
  ds = tf.data.TFRecordDataset(str(tmp_path / "x.tfrecords")).map(lsun_tfrecords.parse_example)
  np.testing.assert_array_equal(np.stack(list(tfds.as_numpy(ds))), images)


# ----------------------------------------------------------------------------- image folder


def test_image_folder(tmp_path):
  rng = np.random.default_rng(2)
  square = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
  Image.fromarray(square).save(tmp_path / "a.png")
  Image.fromarray(rng.integers(0, 256, size=(10, 16, 3), dtype=np.uint8)).save(tmp_path / "b.PNG")
  (tmp_path / "sub").mkdir()
  gray = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
  Image.fromarray(gray, mode="L").save(tmp_path / "sub" / "c.png")
  (tmp_path / "notes.txt").write_text("not an image")
  config = make_config("folder", tmp_path, image_size=8, num_channels=3, batch_size=2)
  images = eval_images(config, batch_size=2)
  assert images.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(to_uint8(images[0]), square)
  np.testing.assert_array_equal(to_uint8(images[2]), np.repeat(gray[..., None], 3, axis=-1))
  batch = next(pipeline.create_train_dataset(config, process_index=0, process_count=1))
  assert batch.shape == (2, 8, 8, 3) and batch.dtype == np.float32


# ----------------------------------------------------------------------------- labels


def digit_labels() -> dict[bytes, int]:
  """{uint8 8x8 image bytes: label} of the train digits, as stored and mirrored (all distinct)."""
  images, labels = digits.load_digits_uint8()
  table = {}
  for image, label in zip(images[: digits.NUM_TRAIN], labels[: digits.NUM_TRAIN], strict=True):
    table[image.tobytes()] = table[image[:, ::-1].tobytes()] = int(label)
  assert len(table) == 2 * digits.NUM_TRAIN
  return table


def assert_same_batches(labelled, expected_images, expected_labels=None):
  """`labelled` (images, labels) batches hold exactly `expected_images` (and labels)."""
  assert len(labelled) == len(expected_images)
  for step, (images, labels) in enumerate(labelled):
    assert images.dtype == np.float32 and images.tobytes() == expected_images[step].tobytes()
    assert labels.dtype == np.int32 and labels.shape == (len(images),)
    if expected_labels is not None:
      np.testing.assert_array_equal(labels, expected_labels[step])


@pytest.mark.parametrize("process_index,process_count,buffer", [(0, 1, 10_000), (1, 2, 300)])
def test_digit_labels_ride_with_their_images(digits_dir, process_index, process_count, buffer):
  # 8x8: no resize, so each yielded image is a train digit, mirrored where flipped. A full shuffle
  # (one process) or a 300-example buffer after the stored order (two), flips on, and an epoch
  # ends inside the last steps, which a resumed stream crosses.
  config = make_config(data_dir=digits_dir, image_size=8, batch_size=100 * process_count)
  config.data.shuffle_buffer = buffer
  kwargs = dict(process_index=process_index, process_count=process_count)
  steps = digits.NUM_TRAIN // process_count // 100 + 2
  plain = take(pipeline.create_train_dataset(config, **kwargs), steps)
  labelled = take(pipeline.create_train_dataset(config, labels=True, **kwargs), steps)
  table = digit_labels()
  expected = [[table[image.tobytes()] for image in to_uint8(images)] for images in plain]
  assert_same_batches(labelled, plain, expected)
  assert set(np.concatenate(expected)) == set(range(10))
  start = steps - 3
  resumed = take(pipeline.create_train_dataset(config, start_step=start, labels=True, **kwargs), 3)
  assert_same_batches(resumed, plain[start:], expected[start:])


def test_processes_label_streams_partition_the_labelled_split(digits_dir):
  config = make_config(data_dir=digits_dir, image_size=8, batch_size=500)
  config.data.num_shards = 4  # Two shards per process, whose labels are concatenated too.
  config.data.random_flip = False
  images, labels = digits.load_digits_uint8()
  everything = collections.Counter(
    (image.tobytes(), int(label))
    for image, label in zip(images[: digits.NUM_TRAIN], labels[: digits.NUM_TRAIN], strict=True)
  )
  parts = []
  for process_index in range(2):
    # 3 steps of 2 x 125 = one epoch of each of the process's two 375-example shards.
    kwargs = dict(process_index=process_index, process_count=2)
    labelled = take(pipeline.create_train_dataset(config, labels=True, **kwargs), 3)
    parts.append(
      collections.Counter(
        (image.tobytes(), int(label))
        for batch, batch_labels in labelled
        for image, label in zip(to_uint8(batch), batch_labels, strict=True)
      )
    )
  assert parts[0] + parts[1] == everything
  # Process 1's images are those of its labels=False stream.
  assert_same_batches(labelled, take(pipeline.create_train_dataset(config, **kwargs), 3))


def test_cifar10_mock_labels_ride_with_their_images(tmp_path):
  config = make_config("cifar10", tmp_path, image_size=32, num_channels=3, batch_size=8)
  kwargs = dict(process_index=0, process_count=1, labels=True)
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path))
    examples = list(tfds.as_numpy(builder.as_dataset(split="train")))
    labelled = take(pipeline.create_train_dataset(config, **kwargs), 5)  # Two epochs of 20.
    resumed = take(pipeline.create_train_dataset(config, start_step=2, **kwargs), 3)
  table = {}
  for example in examples:  # Mock labels: random in [0, 10), fixed per (random) image.
    image, label = example["image"], int(example["label"])
    table[image.tobytes()] = table[image[:, ::-1].tobytes()] = label
  assert len(table) == 40
  for images, labels in labelled:
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, [table[image.tobytes()] for image in to_uint8(images)])
  assert len(set(np.concatenate([labels for _, labels in labelled]))) > 3
  assert_same_batches(resumed, *zip(*labelled[2:], strict=True))


def write_class_folders(root) -> dict[int, int]:
  """Class sub-folders of 4x4 grayscale PNGs, each image's value 50 * k + i encoding k, its class's
  index in sorted name order ('Moth' < 'ant' < 'zebra'); returns {value: k}."""
  expected = {}
  for name, index, count in (("zebra", 2, 5), ("ant", 1, 4), ("Moth", 0, 3)):
    for i in range(count):
      folder = root / name / ("deep" if i == 4 else "")  # Any depth below the class folder.
      folder.mkdir(parents=True, exist_ok=True)
      value = 50 * index + i
      Image.fromarray(np.full((4, 4), value, np.uint8), mode="L").save(folder / f"{i}.png")
      expected[value] = index
  (root / "empty").mkdir()  # Holds no image: not a class.
  (root / "ant" / "notes.txt").write_text("not an image")
  return expected


def labelled_values(batches) -> list[tuple[int, int]]:
  """(pixel value, label) of each image of `batches` of constant 4x4 images."""
  return [
    (int(image[0, 0, 0]), int(label))
    for images, labels in batches
    for image, label in zip(to_uint8(images), labels, strict=True)
  ]


def test_image_folder_class_subfolders_give_sorted_name_indices(tmp_path):
  expected = write_class_folders(tmp_path)
  config = make_config("folder", tmp_path, image_size=4, num_channels=1, batch_size=4)
  assert pipeline.num_classes(config) == 3
  assert pipeline.get_dataset_info(config)["num_classes"] == 3
  parts = []
  for process_index in range(2):  # 12 images: one epoch of a process is 3 steps of 2.
    kwargs = dict(process_index=process_index, process_count=2)
    labelled = take(pipeline.create_train_dataset(config, labels=True, **kwargs), 5)
    assert_same_batches(labelled, take(pipeline.create_train_dataset(config, **kwargs), 5))
    resumed = take(pipeline.create_train_dataset(config, start_step=2, labels=True, **kwargs), 3)
    assert_same_batches(resumed, *zip(*labelled[2:], strict=True))
    parts.append(labelled_values(labelled[:3]))
  assert sorted(parts[0] + parts[1]) == sorted(expected.items())
  assert set(parts[0]).isdisjoint(parts[1])


def test_image_folder_with_top_level_images_has_no_labels(tmp_path):
  write_class_folders(tmp_path)
  Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "stray.png")
  config = make_config("folder", tmp_path, image_size=4, num_channels=1, batch_size=4)
  assert pipeline.num_classes(config) == 0
  with pytest.raises(pipeline.LabelsError, match="no class labels to yield.*holds 1 of them"):
    pipeline.create_train_dataset(config, process_index=0, process_count=1, labels=True)
  batch = next(pipeline.create_train_dataset(config, process_index=0, process_count=1))
  assert batch.shape == (4, 4, 4, 1)  # Unconditional training still reads all 13 images.


def test_num_classes_of_each_source(tmp_path, digits_dir):
  assert pipeline.num_classes(make_config(data_dir=digits_dir)) == 10
  assert pipeline.num_classes(make_config("cifar10", tmp_path)) == 10  # Metadata: not prepared.
  for dataset in ("celeb_a_hq", "lsun_church", "lsun_bedroom", "lsun_cat"):
    assert pipeline.num_classes(make_config(dataset, tmp_path)) == 0, dataset
  write_stylegan_file(tmp_path / "x-r02.tfrecords", np.zeros((2, 3, 4, 4), np.uint8))
  config = make_config("lsun_cat", tmp_path / "*.tfrecords")
  config.data.source = "tfrecords"
  assert pipeline.num_classes(config) == 0
  with pytest.raises(pipeline.LabelsError, match="StyleGAN TFRecords hold images only"):
    pipeline.create_train_dataset(config, process_index=0, process_count=1, labels=True)
  assert pipeline.num_classes(make_config("folder", tmp_path / "missing")) == 0
  Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(tmp_path / "flat.png")
  assert pipeline.num_classes(make_config("folder", tmp_path)) == 0  # Top-level images only.


def check_labels_message(config, num_classes) -> str:
  config.model.num_classes = num_classes
  with pytest.raises(pipeline.LabelsError) as error:
    pipeline.check_labels(config)
  message = str(error.value)
  assert "\n" not in message and f"model.num_classes={num_classes} " in message
  return message


def test_check_labels(tmp_path, digits_dir):
  config = make_config("celeb_a_hq", tmp_path)
  pipeline.check_labels(config)  # Unconditional, with or without a model.num_classes field.
  config.model.num_classes = 0
  pipeline.check_labels(config)  # Unconditional: any dataset.
  assert check_labels_message(config, 10) == (
    "model.num_classes=10 needs class labels, but dataset celeb_a_hq has none: TFDS "
    "celeb_a_hq/256 has no 'label' feature. Set --config.model.num_classes=0 to train "
    "unconditionally."
  )
  config = make_config("lsun_church", tmp_path / "*.tfrecords")
  config.data.source = "tfrecords"
  message = check_labels_message(config, 3)
  assert "dataset lsun_church has none: StyleGAN TFRecords" in message
  config = make_config("cifar10", tmp_path)
  config.model.num_classes = 10
  pipeline.check_labels(config)  # Metadata only: the data need not be prepared yet.
  assert check_labels_message(config, 100) == (
    "model.num_classes=100 does not match dataset cifar10: TFDS cifar10 has 10 classes. "
    "Set --config.model.num_classes=10."
  )
  message = check_labels_message(make_config(data_dir=digits_dir), 9)
  assert "dataset digits: TFDS ddpm_digits has 10 classes" in message
  assert message.endswith("Set --config.model.num_classes=10.")


def test_check_labels_of_image_folders(tmp_path):
  folder = tmp_path / "classes"
  write_class_folders(folder)
  config = make_config("folder", folder)
  config.model.num_classes = 3
  pipeline.check_labels(config)
  message = check_labels_message(config, 4)
  assert f"dataset folder: {folder} has 3 class sub-folders (Moth, ant, zebra)" in message
  assert message.endswith("Set --config.model.num_classes=3.")
  Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(folder / "stray.png")
  message = check_labels_message(config, 3)
  assert f"every image is in a class sub-folder ({folder}/<class>/...), but {folder} itself " in (
    message
  )
  assert message.endswith(
    "holds 1 of them. Set --config.model.num_classes=0 to train unconditionally."
  )
  config.data.data_dir = str(tmp_path / "missing")
  with pytest.raises(pipeline.DatasetNotPreparedError, match="missing"):
    pipeline.check_labels(config)  # No images at all is not a labels problem.


# ----------------------------------------------------------------------------- errors


def test_unprepared_tfds_dataset_raises_one_clear_error(tmp_path):
  config = make_config("cifar10", tmp_path, image_size=32, num_channels=3)
  with pytest.raises(pipeline.DatasetNotPreparedError) as error:
    pipeline.create_train_dataset(config, process_index=0, process_count=1)
  for text in ("cifar10", str(tmp_path), "download_and_prepare"):
    assert text in str(error.value)
  config.data.dataset = "celeb_a_hq"
  with pytest.raises(pipeline.DatasetNotPreparedError, match="manual"):
    pipeline.create_eval_dataset(config, process_index=0, process_count=1, batch_size_per_process=8)


def test_unmatched_tfrecord_pattern_and_empty_folder(tmp_path):
  pattern = str(tmp_path / "*-r08.tfrecords")
  config = make_config("lsun_bedroom", pattern, image_size=8, num_channels=3)
  config.data.source = "tfrecords"
  with pytest.raises(pipeline.DatasetNotPreparedError) as error:
    pipeline.create_train_dataset(config, process_index=0, process_count=1)
  assert pattern in str(error.value) and "dataset_tool.py" in str(error.value)
  config = make_config("folder", tmp_path / "missing", image_size=8, num_channels=3)
  with pytest.raises(pipeline.DatasetNotPreparedError, match="missing"):
    pipeline.create_train_dataset(config, process_index=0, process_count=1)


def test_bad_config_values():
  with pytest.raises(ValueError, match="data.dataset='imagenet'.*cifar10") as error:
    pipeline.create_train_dataset(make_config("imagenet"), process_index=0, process_count=1)
  assert not isinstance(error.value, pipeline.DatasetNotPreparedError)
  with pytest.raises(ValueError, match="data.dataset='imagenet'"):
    pipeline.get_dataset_info(make_config("imagenet"))
  config = make_config("lsun_cat")
  config.data.source = "lmdb"
  with pytest.raises(ValueError, match="data.source"):
    pipeline.create_train_dataset(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="divide training.batch_size=101"):
    pipeline.create_train_dataset(make_config(batch_size=101), process_index=0, process_count=2)
