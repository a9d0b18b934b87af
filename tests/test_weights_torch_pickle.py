"""The torch-free reader of torch.save files, against files written like torch (and torch's own
where installed)."""

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch_writer

from ddpm_jax.weights import torch_pickle

# -- The torch-free .pth reader and writer. ----------------------------------------------------


def _sample_state_dict():
  rng = np.random.default_rng(10)
  base = rng.standard_normal((4, 6)).astype(np.float32)
  return {
    "conv.weight": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
    "base": base,
    "transposed": base.T,  # A non-contiguous view of `base`: shares its storage.
    "strided": base[1:, ::2],  # Offset 6, strides (6, 2).
    "double": rng.standard_normal(5),
    "half": rng.standard_normal((2, 2)).astype(np.float16),
    "steps": np.array(12345678901, dtype=np.int64),  # 0-d, past int32.
    "int32": np.arange(-3, 3, dtype=np.int32),
    "bytes": np.arange(7, dtype=np.uint8),
    "mask": np.array([True, False, True]),
    "empty": np.zeros((0, 3), np.float32),
  }


@pytest.mark.parametrize("legacy_format", [False, True])
def test_torch_pickle_round_trip(tmp_path, legacy_format):
  state_dict = _sample_state_dict()
  path = tmp_path / "sd.pth"
  torch_writer.save_state_dict(path, state_dict, legacy_format=legacy_format)
  loaded = torch_pickle.load_state_dict(path)
  assert list(loaded) == list(state_dict)
  for key, value in state_dict.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
    np.testing.assert_array_equal(loaded[key], value)
  assert zipfile.is_zipfile(path) != legacy_format


def test_torch_pickle_zip_layout_matches_torch(tmp_path):
  path = tmp_path / "weights.pth"
  torch_writer.save_state_dict(path, _sample_state_dict())
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    assert names[0] == "weights/data.pkl" and "weights/version" in names
    # The three views of `base` share one storage: 11 tensors, 9 storages.
    assert sum(n.startswith("weights/data/") for n in names) == 9
    for info in archive.infolist():
      name_len, extra_len = np.frombuffer(
        raw[info.header_offset + 26 : info.header_offset + 30], "<u2"
      )
      assert (info.header_offset + 30 + int(name_len) + int(extra_len)) % 64 == 0, info.filename
    pickled = archive.read("weights/data.pkl")
  assert b"torch._utils\n_rebuild_tensor_v2" in pickled and b"torch\nFloatStorage" in pickled


def test_torch_pickle_refuses_other_globals(tmp_path):
  class Evil:
    def __reduce__(self):
      import os

      return (os.system, ("echo pwned",))

  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
  (tmp_path / "evil.pth").write_bytes(buffer.getvalue())
  with pytest.raises(
    torch_pickle.TorchFileError,
    match=r"evil\.pth: .*Refusing to load global "
    r"(posix|nt)\.system: only state dicts of tensors",
  ):
    torch_pickle.load(tmp_path / "evil.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a torch file at all")
  with pytest.raises(torch_pickle.TorchFileError, match=r"junk\.pth: not a PyTorch zip or legacy"):
    torch_pickle.load(tmp_path / "junk.pth")


# -- Extra cross-checks against real PyTorch (skipped without torch). --------------------------


def test_torch_reads_our_files_and_we_read_torchs(tmp_path):
  torch = pytest.importorskip("torch")
  state_dict = _sample_state_dict()
  for legacy in (False, True):
    path = tmp_path / f"ours_{legacy}.pth"
    torch_writer.save_state_dict(path, state_dict, legacy_format=legacy)
    loaded = torch.load(path, weights_only=True)
    for key, value in state_dict.items():
      np.testing.assert_array_equal(loaded[key].numpy(), value)
    assert (
      loaded["transposed"].untyped_storage().data_ptr()
      == loaded["base"].untyped_storage().data_ptr()
    )
    base = torch.arange(24.0).reshape(4, 6)
    theirs = {"a": base, "t": base.t(), "s": base[1:, ::2], "i": torch.tensor(7), "h": base.half()}
    path = tmp_path / f"theirs_{legacy}.pth"
    torch.save(theirs, path, _use_new_zipfile_serialization=not legacy)
    ours = torch_pickle.load_state_dict(path)
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value.numpy())
