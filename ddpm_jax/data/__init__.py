"""The input data: `pipeline` (deterministic, resumable tf.data streams, sharded per process),
`specs` (the named datasets), `digits` (the embedded 8x8 digits) and its TFDS builder
`digits_tfds`, `image_folder` and `lsun_tfrecords` (non-TFDS formats). Only training and the
evaluation of real data import TensorFlow, through `pipeline`."""
