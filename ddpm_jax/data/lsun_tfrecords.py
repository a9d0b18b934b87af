"""StyleGAN-style image TFRecords, the format of the official DDPM LSUN data.

StyleGAN's `dataset_tool.py create_lsun` writes one file per resolution, e.g.
`lsun-church-r08.tfrecords` for 256x256. Each record is a `tf.train.Example` with `shape`
(int64 [3], C, H, W) and `data` (bytes, uint8 CHW), uncompressed.
"""

import struct

import numpy as np
import tensorflow as tf

_FEATURES = {
  "shape": tf.io.FixedLenFeature([3], tf.int64),
  "data": tf.io.FixedLenFeature([], tf.string),
}
_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length.
_FOOTER_BYTES = 4  # uint32 masked CRC of the data.


def list_files(pattern: str) -> list[str]:
  """Returns the files matching the glob `pattern`, sorted (a deterministic order)."""
  return sorted(tf.io.gfile.glob(pattern))


def parse_example(serialized: tf.Tensor) -> tf.Tensor:
  """Decodes one serialized record into a uint8 image [H, W, C]."""
  example = tf.io.parse_single_example(serialized, _FEATURES)
  image = tf.reshape(tf.io.decode_raw(example["data"], tf.uint8), example["shape"])
  return tf.transpose(image, [1, 2, 0])


def write_tfrecords(path: str, images: np.ndarray) -> None:
  """Writes uint8 images [N, H, W, C] to `path` in the StyleGAN format (tests, small exports)."""
  with tf.io.TFRecordWriter(path) as writer:
    for image in images:
      chw = np.ascontiguousarray(np.asarray(image, np.uint8).transpose(2, 0, 1))
      feature = {
        "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=chw.shape)),
        "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[chw.tobytes()])),
      }
      writer.write(
        tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
      )


def _record_length_at(f, offset: int) -> int:
  f.seek(offset)
  header = f.read(8)
  return struct.unpack("<Q", header)[0] if len(header) == 8 else -1


def count_records(path: str) -> int:
  """Returns the number of records in one TFRecord file.

  StyleGAN files hold records of one constant size, so the count is the file size over the
  record size, checked at the first, middle and last record; only files that fail the check are
  scanned (reading an LSUN bedroom file would take many minutes).
  """
  size = tf.io.gfile.stat(path).length
  if size == 0:
    return 0
  with tf.io.gfile.GFile(path, "rb") as f:
    record = _record_length_at(f, 0) + _HEADER_BYTES + _FOOTER_BYTES
    if record > _HEADER_BYTES + _FOOTER_BYTES and size % record == 0:
      count = size // record
      offsets = {(count // 2) * record, (count - 1) * record}
      if all(_record_length_at(f, o) + _HEADER_BYTES + _FOOTER_BYTES == record for o in offsets):
        return count
  return int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1))
