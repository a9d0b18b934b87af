"""Tests of ddpm_jax.data (the pipeline and the datasets) on offline data.

The embedded digits (prepared once per session), `tfds.testing.mock_data` for CIFAR-10, tiny
StyleGAN TFRecords and PNG folders written into tmp_path.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from ddpm_jax.data import digits_tfds, lsun_tfrecords, pipeline


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
  assert info == {"image_shape": (16, 16, 1), "num_train_examples": 1500, "num_eval_examples": 297}


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
