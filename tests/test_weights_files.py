"""Hostile or broken weight files: each ends in one line naming the file, or loads correctly,
within bounded time and memory; nothing runs, nothing is written.

The readers are `torch_pickle` (torch .bin/.pth files, zip and legacy formats) and the
`safetensors` package behind `files.weights_header` / `files.read_weights`. Loads that could
hang or allocate without bound run in a subprocess (`run_readers`) under an address-space limit
and a timeout, so a regression fails the test instead of the machine.
"""

import io
import json
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile
import zlib

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch_writer
from conftest import tiny_digits_config
from flax import traverse_util

from ddpm_jax import convert
from ddpm_jax.weights import convert_inception, files, matching, torch_pickle
from ddpm_jax.weights import diffusers as diffusers_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
GIB = 1 << 30


# -- Writing torch files by hand (any numbers, any structure). ---------------------------------


def tensor_pickle(tensors, storage_type: str = "FloatStorage") -> bytes:
  """An OrderedDict pickle of `_rebuild_tensor_v2` tensors, as torch writes it; `tensors`:
  [(name, storage key, storage numel, offset, size, stride)]."""
  writer = torch_writer._PickleWriter()
  writer.empty_ordered_dict()
  writer.out.write(pickle.MARK)
  kind = torch_pickle._StorageType(storage_type, None)
  for name, key, numel, offset, size, stride in tensors:
    writer.string(name)
    writer.tensor(("storage", kind, key, "cpu", numel), offset, size, stride)
  writer.out.write(pickle.SETITEMS)
  return writer.finish()


def dict_pickle(value_opcodes: bytes) -> bytes:
  """{'x': <the object `value_opcodes` push>} as a protocol-2 pickle."""
  return b"\x80\x02}" + pickle.BINUNICODE + struct.pack("<I", 1) + b"x" + value_opcodes + b"s."


def write_zip(path, members: dict) -> str:
  """A torch-style zip of stored members {name under 'archive/': bytes}."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    for name, data in members.items():
      archive.writestr(f"archive/{name}", data)
  return str(path)


def raw_zip(members) -> bytes:
  """A zip written byte by byte: [(name, payload, method, crc, file_size)], so the payload may be
  pre-compressed and the header may lie about it."""
  out, central = io.BytesIO(), []
  for name, payload, method, crc, size in members:
    offset, encoded = out.tell(), name.encode()
    out.write(
      struct.pack(
        "<4s5H3I2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(payload), size, len(encoded), 0
      )
      + encoded
      + payload
    )
    central.append(
      struct.pack(
        "<4s6H3I5H2I",
        b"PK\x01\x02",
        20,
        20,
        0,
        method,
        0,
        0x21,
        crc,
        len(payload),
        size,
        len(encoded),
        0,
        0,
        0,
        0,
        0,
        offset,
      )
      + encoded
    )
  directory, start = b"".join(central), out.tell()
  out.write(
    directory
    + struct.pack(
      "<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), start, 0
    )
  )
  return out.getvalue()


def deflate_zeros(mib: int) -> tuple[bytes, int]:
  """(raw DEFLATE stream, CRC-32) of `mib` MiB of zeros: one flushed 1 MiB block repeated, so
  1 GiB takes about 1 MB."""
  zeros = bytes(1 << 20)
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
  crc = 0
  for _ in range(mib):
    crc = zlib.crc32(zeros, crc)
  return block * mib + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


def write_safetensors(path, header: dict, data: bytes = b"", length: int | None = None) -> str:
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
  return str(path)


# -- Running readers in a bounded subprocess. --------------------------------------------------

HARNESS = r"""
import json, resource, sys, time, traceback, zlib
import numpy as np
from ddpm_jax.weights import torch_pickle
cases = json.load(open(sys.argv[1]))
if any(case["reader"].startswith("weights") for case in cases):
  from ddpm_jax import convert
  from ddpm_jax.weights import files
  ours = (torch_pickle.TorchFileError, convert.ConversionError)
else:
  ours = (torch_pickle.TorchFileError,)
try:  # Linux: the address space may grow by argv[2] bytes past the imports.
  status = open("/proc/self/status").read()
  vm = int(status.split("VmSize:")[1].split()[0]) * 1024
  resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]), resource.RLIM_INFINITY))
except OSError:
  pass
kib = 1024 if sys.platform == "darwin" else 1  # ru_maxrss: bytes on macOS, KiB on Linux.
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // kib

def arrays(result):
  return {k: [list(v.shape), str(v.dtype), zlib.crc32(np.ascontiguousarray(v).tobytes())]
          for k, v in result.items()}

def nested(result):
  x, depth, shared = result["x"], 0, True
  while isinstance(x, list) and x:
    shared, x, depth = shared and all(y is x[0] for y in x), x[0], depth + 1
  return {"depth": depth, "shared": shared}

def read(case):
  path, reader, expected = case["path"], case["reader"], case.get("expected")
  if reader == "torch" and expected is None:
    return arrays(torch_pickle.load_state_dict(path))
  if reader == "torch":
    return arrays(torch_pickle.load_state_dict(
      path, {k: (tuple(s), d) for k, (s, d) in expected.items()}))
  if reader == "torch_header":
    return {k: [list(s.shape), str(s.dtype)] for k, s in torch_pickle.read_header(path).items()}
  if reader == "torch_load":
    return nested(torch_pickle.load(path))
  if reader == "weights":
    return arrays(files.read_weights(
      path, None if expected is None else {k: tuple(s) for k, s in expected.items()}))
  if reader == "weights_header":
    return {k: [list(s.shape), str(s.dtype)] for k, s in files.weights_header(path).items()}
  raise ValueError(reader)

results, start = [], time.perf_counter()
for case in cases:
  t = time.perf_counter()
  try:
    result = {"outcome": "ok", "value": read(case)}
  except ours as e:
    result = {"outcome": "error", "type": type(e).__name__, "message": str(e)}
  except BaseException:
    result = {"outcome": "crash", "message": traceback.format_exc()}
  result["seconds"] = time.perf_counter() - t
  results.append(result)
print(json.dumps({"results": results, "seconds": time.perf_counter() - start,
                  "rss_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // kib - rss}))
"""


def run_readers(tmp_path, cases, memory: int = GIB, timeout: float = 120) -> dict:
  """Runs each case {path, reader, expected} in one subprocess whose address space may grow by
  `memory` bytes after its imports; -> {"results": [...], "seconds", "rss_growth" (KiB)}."""
  spec = tmp_path / "cases.json"
  spec.write_text(json.dumps(cases))
  try:
    done = subprocess.run(
      [sys.executable, "-c", HARNESS, str(spec), str(memory)],
      env=ENV,
      capture_output=True,
      text=True,
      timeout=timeout,
    )
  except subprocess.TimeoutExpired:
    pytest.fail(f"the readers did not finish {len(cases)} files in {timeout} s")
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.splitlines()[-1])


def assert_one_line_error(result, path, pattern: str, type_name: str = "TorchFileError"):
  assert result["outcome"] == "error", result
  message = result["message"]
  assert result["type"] == type_name and "\n" not in message, message
  assert message.startswith(f"{path}: "), message
  assert re.search(pattern, message), (pattern, message)


# -- 6. --step must be >= 0. --------------------------------------------------------------------


def random_digits_weights(tmp_path) -> str:
  """A diffusers .safetensors of random weights for `configs/digits.py` with one ResBlock."""
  config = tiny_digits_config()
  rng = np.random.default_rng(0)
  flat = {
    p: rng.normal(size=s.shape).astype(np.float32)
    for p, s in matching.variable_shapes(config).items()
  }
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(
    diffusers_weights.to_diffusers_state_dict(traverse_util.unflatten_dict(flat, sep="/")), path
  )
  return path


def run_convert(cwd, *args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ddpm_jax.convert", *args],
    env=ENV,
    cwd=cwd,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_negative_step_is_refused_before_any_work(tmp_path):
  weights = random_digits_weights(tmp_path)
  with pytest.raises(ValueError, match=r"^step must be >= 0, got -5$"):
    convert.convert("diffusers", weights, tiny_digits_config(), str(tmp_path / "run"), step=-5)
  done = run_convert(
    tmp_path,
    "--source=diffusers",
    f"--input={weights}",
    f"--config={REPO}/configs/digits.py",
    "--config.model.num_res_blocks=1",
    "--workdir=run",
    "--step=-5",
  )
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert errors == ["error: --step must be >= 0, got -5; nothing was written."], done.stderr
  assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()


# -- 7. Shared references: walked once, depth and size bounded. ---------------------------------


def shared_lists_pickle(depth: int) -> bytes:
  """{'x': L_depth} where L_0 = [] and L_i = [L_{i-1}, L_{i-1}]: 2**depth paths, depth lists."""
  ops = b"]q\x000"  # EMPTY_LIST, BINPUT 0, POP.
  for i in range(depth):  # EMPTY_LIST, MARK, BINGET i, BINGET i, APPENDS, BINPUT i + 1, POP.
    ops += b"](h" + bytes([i]) + b"h" + bytes([i]) + b"eq" + bytes([i + 1]) + b"0"
  return dict_pickle(ops + b"h" + bytes([depth]))


def test_shared_nested_lists_are_walked_once_and_depth_is_bounded(tmp_path):
  deep = write_zip(tmp_path / "deep.bin", {"data.pkl": shared_lists_pickle(64)})
  assert os.path.getsize(deep) < 1000  # The 803-byte file: 2**64 paths.
  shallow = write_zip(tmp_path / "shallow.bin", {"data.pkl": shared_lists_pickle(30)})
  cases = [{"path": deep, "reader": r} for r in ("torch", "torch_header", "torch_load")]
  cases += [{"path": shallow, "reader": "torch_load"}, {"path": shallow, "reader": "torch"}]
  run = run_readers(tmp_path, cases, timeout=60)
  results = run["results"]
  for result in results[:2]:  # A state dict's entries must be tensors: nothing is walked.
    assert_one_line_error(result, deep, r"tensor 'x' is \[\[\[.*\]\]\], not a tensor$")
  assert_one_line_error(results[2], deep, r"containers nested deeper than 32 levels$")
  # 30 levels, 2**30 paths: returned in 31 steps with the sharing kept (L_i[0] is L_i[1]).
  assert results[3]["outcome"] == "ok" and results[3]["value"] == {"depth": 30, "shared": True}
  assert_one_line_error(results[4], shallow, r"tensor 'x' is \[\[\[.*\]\]\], not a tensor$")
  assert run["seconds"] < 10, run


def test_total_container_entries_are_bounded(tmp_path, monkeypatch):
  monkeypatch.setattr(torch_pickle, "_MAX_ELEMENTS", 100)
  path = write_zip(tmp_path / "wide.bin", {"data.pkl": dict_pickle(b"(" + b"N" * 101 + b"l")})
  with pytest.raises(
    torch_pickle.TorchFileError, match=rf"^{re.escape(path)}: more than 100 container entries$"
  ):
    torch_pickle.load(path)


# -- 8. Memory bombs: shapes checked before anything is allocated. ------------------------------


def stride0_file(tmp_path, name: str, side: int) -> str:
  """One float32 element viewed as [side, side] with strides (0, 0): legal in torch."""
  return write_zip(
    tmp_path / name,
    {
      "data.pkl": tensor_pickle([("w", "0", 1, 0, (side, side), (0, 0))]),
      "data/0": np.float32(3.5).tobytes(),
    },
  )


def test_stride0_views_cannot_allocate_more_than_the_expected_shapes_need(tmp_path):
  small, big = (
    stride0_file(tmp_path, "1gib.bin", 1 << 14),
    stride0_file(tmp_path, "64gib.bin", 1 << 17),
  )
  legit = stride0_file(tmp_path, "legit.bin", 3)
  assert os.path.getsize(small) < 600
  cases = [
    {"path": small, "reader": "torch"},
    {"path": big, "reader": "torch"},
    {"path": small, "reader": "torch", "expected": {"w": [[4, 4], None]}},
    {"path": small, "reader": "torch_header"},
    {"path": legit, "reader": "torch", "expected": {"w": [[3, 3], "float32"]}},
  ]
  run = run_readers(tmp_path, cases, memory=GIB)
  results = run["results"]
  assert_one_line_error(
    results[0],
    small,
    r"its tensors would take 1073741824 bytes, more than "
    r"the \d+ allowed \(pass the expected shapes",
  )
  assert_one_line_error(results[1], big, r"would take 68719476736 bytes")
  assert_one_line_error(
    results[2],
    small,
    r"tensor 'w' has shape \(16384, 16384\), expected "
    r"\(4, 4\)$",
  )
  assert results[3]["value"] == {"w": [[16384, 16384], "float32"]}  # The header alone: no data.
  assert results[4]["value"]["w"][:2] == [[3, 3], "float32"]
  assert results[4]["value"]["w"][2] == zlib.crc32(np.full((3, 3), 3.5, np.float32).tobytes())
  assert run["rss_growth"] < 100 * 1024, run  # KiB.


def test_a_memo_index_cannot_claim_gigabytes(tmp_path):
  """The C unpickler sizes its memo array by the largest index named: these 9 bytes took 2 GB."""
  pickled = b"\x80\x02}r\xff\xff\xff\x0f."  # {}, LONG_BINPUT 2**28 - 1.
  path = write_zip(tmp_path / "memo.bin", {"data.pkl": pickled})
  run = run_readers(
    tmp_path,
    [
      {"path": path, "reader": "torch"},
      {"path": path, "reader": "torch", "expected": {"w": [[2], None]}},
    ],
  )
  assert run["results"][0]["outcome"] == "ok" and run["results"][0]["value"] == {}
  assert_one_line_error(run["results"][1], path, r"no tensor 'w'$")
  assert run["rss_growth"] < 100 * 1024 and run["seconds"] < 5, run


def deflate_bomb(tmp_path, name: str, numel: int, size: int, file_size: int) -> str:
  """A zip whose record data/0 is 1 GiB of zeros DEFLATEd into ~1 MB; the pickle declares a
  storage of `numel` floats and a tensor [size]; the zip header says `file_size` bytes (and the
  CRC-32 of that many zeros)."""
  stream, crc = deflate_zeros(1024)
  crc = crc if file_size == GIB else zlib.crc32(bytes(file_size))
  pickled = tensor_pickle([("w", "0", numel, 0, (size,), (1,))])
  path = tmp_path / name
  path.write_bytes(
    raw_zip(
      [
        ("archive/data.pkl", pickled, 0, zlib.crc32(pickled), len(pickled)),
        ("archive/data/0", stream, zipfile.ZIP_DEFLATED, crc, file_size),
      ]
    )
  )
  return str(path)


def test_deflate_bombs_inflate_no_further_than_the_tensors_need(tmp_path):
  honest = deflate_bomb(tmp_path, "honest.bin", 1 << 28, 1 << 28, GIB)
  assert os.path.getsize(honest) < 2 << 20
  lying = deflate_bomb(tmp_path, "lying.bin", 100, 100, 400)  # Header: 400 bytes.
  sliced = deflate_bomb(tmp_path, "sliced.bin", 1 << 28, 100, GIB)  # [100] of a 1 GiB storage.
  cases = [
    {"path": honest, "reader": "torch"},
    {"path": honest, "reader": "torch", "expected": {"w": [[100], None]}},
    {"path": sliced, "reader": "torch"},
    {"path": lying, "reader": "torch", "expected": {"w": [[100], "float32"]}},
  ]
  run = run_readers(tmp_path, cases, memory=GIB)
  results = run["results"]
  assert_one_line_error(results[0], honest, r"would take 1073741824 bytes, more than the")
  assert_one_line_error(
    results[1],
    honest,
    r"tensor 'w' has shape \(268435456,\), expected "
    r"\(100,\)$",
  )
  zeros = zlib.crc32(bytes(400))
  assert results[2]["value"] == {"w": [[100], "float32", zeros]}  # 400 bytes inflated, not 1 GiB.
  assert results[3]["value"] == {"w": [[100], "float32", zeros]}
  assert run["rss_growth"] < 100 * 1024 and run["seconds"] < 10, run


def test_a_state_dict_is_checked_against_the_config_before_any_tensor_is_read(tmp_path):
  config = tiny_digits_config()
  shapes = {
    diffusers_weights.diffusers_key(p, 2): diffusers_weights.torch_shape(p, tuple(s.shape))
    for p, s in matching.variable_shapes(config).items()
  }
  shapes["conv_in.weight"] = (1 << 14, 1 << 14)  # 1 GiB.
  tensors = [
    (key, str(i), 1, 0, shape, (0,) * len(shape))  # Each one float, stride 0.
    for i, (key, shape) in enumerate(shapes.items())
  ]
  members = {"data.pkl": tensor_pickle(tensors)}
  members.update({f"data/{i}": np.float32(1).tobytes() for i in range(len(tensors))})
  path = write_zip(tmp_path / "diffusion_pytorch_model.bin", members)
  tracemalloc.start()
  try:
    with pytest.raises(convert.ConversionError) as info:
      convert.load_diffusers_state_dict(path, config)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(info.value)
  assert message.startswith(f"The diffusers weights {path} does not fit the U-Net of the config")
  assert "mis-shaped (1):\n    conv_in.weight: (16384, 16384), expected (32, 1, 3, 3)" in message
  assert peak < 64 << 20, peak


# -- 9. Every malformed file: one line naming it. -----------------------------------------------


def evil_zip(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

  return write_zip(tmp_path / "evil.bin", {"data.pkl": pickle.dumps({"x": Evil()}, protocol=2)})


def crc_zip(tmp_path):
  path, w = tmp_path / "crc.bin", np.array([1.5, -2.25], np.float32)
  torch_writer.save_state_dict(path, {"w": w})
  raw = bytearray(path.read_bytes())
  raw[raw.index(w.tobytes()) + 5] ^= 1  # Inside record data/0.
  path.write_bytes(bytes(raw))
  return str(path)


def legacy_truncated(tmp_path):
  path = tmp_path / "legacy.bin"
  torch_writer.save_state_dict(path, {"w": np.arange(64, dtype=np.float32)}, legacy_format=True)
  path.write_bytes(path.read_bytes()[:-100])
  return str(path)


def nested_10000(tmp_path):
  return write_zip(tmp_path / "nested.bin", {"data.pkl": dict_pickle(b"(" * 10000 + b"l" * 10000)})


def byteorder_zip(tmp_path):
  return write_zip(
    tmp_path / "order.bin",
    {
      "data.pkl": tensor_pickle([("w", "0", 2, 0, (2,), (1,))]),
      "byteorder": b"middle",
      "data/0": np.ones(2, np.float32).tobytes(),
    },
  )


ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {  # name -> (writer, the problem as the message states it).
  "refused global": (evil_zip, r"Refusing to load global (posix|nt)\.system: only state dicts"),
  "CRC error": (crc_zip, r"corrupt zip archive \(Bad CRC-32 for file 'crc/data/0'\)$"),
  "missing member": (
    lambda d: write_zip(
      d / "missing.bin", {"data.pkl": tensor_pickle([("w", "0", 2, 0, (2,), (1,))])}
    ),
    r"the zip has no member 'archive/data/0'$",
  ),
  "negative size": (
    lambda d: write_zip(
      d / "negative.bin",
      {"data.pkl": tensor_pickle([("w", "0", 8, 0, (-1, 4), (4, 1))]), "data/0": bytes(32)},
    ),
    r"tensor 'w': size -1 is not an integer in \[0, 2\*\*62\]$",
  ),
  "truncated legacy": (legacy_truncated, r"truncated: storage '0' ends at byte \d+ of \d+$"),
  "recursion": (nested_10000, r"tensor 'x' is \[\[\[.*\]\]\], not a tensor$"),
  "unknown byteorder": (
    byteorder_zip,
    r"unknown byteorder 'middle' \(expected 'little' or "
    r"'big'\)$",
  ),
  "shape product wraps": (
    lambda d: write_safetensors(
      d / "wrap.safetensors",
      {"w": {"dtype": "F32", "shape": [1 << 32, 1 << 32], "data_offsets": [0, 0]}},
    ),
    r"not a readable weights file \(SafetensorError: .*overflow computing buffer size",
  ),
  "float shape": (
    lambda d: write_safetensors(
      d / "fshape.safetensors", {"w": {**ENTRY, "shape": [2.0]}}, bytes(8)
    ),
    r"invalid type: floating point `2\.0`",
  ),
  "float offsets": (
    lambda d: write_safetensors(
      d / "foffsets.safetensors", {"w": {**ENTRY, "data_offsets": [0.0, 8.0]}}, bytes(8)
    ),
    r"invalid type: floating point",
  ),
  "overlapping offsets": (
    lambda d: write_safetensors(d / "overlap.safetensors", {"a": ENTRY, "b": ENTRY}, bytes(8)),
    r"invalid offset for tensor `[ab]`\)$",
  ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_file_ends_in_one_line_naming_it(tmp_path, case):
  write, problem = MALFORMED[case]
  path = write(tmp_path)
  with pytest.raises(convert.ConversionError) as info:  # The reader convert uses, by format.
    convert.load_diffusers_state_dict(path)
  message = str(info.value)
  assert "\n" not in message and message.startswith(f"{path}: "), message
  assert re.search(problem, message), message
  with pytest.raises(convert.ConversionError) as info:  # Reading only what is expected.
    files.read_weights(path, {"w": (2,)})
  # The same error (safetensors names either of two overlapping tensors, from run to run).
  assert re.sub(r"`[ab]`", "`?`", str(info.value)) == re.sub(r"`[ab]`", "`?`", message)
  if path.endswith(".bin"):  # The same from torch_pickle itself, with and without `expected`.
    for expected in ({"w": ((2,), None)}, None):
      with pytest.raises(torch_pickle.TorchFileError) as info:
        torch_pickle.load_state_dict(path, expected)
      assert str(info.value) == message
  if case == "recursion":  # Walking the structure: bounded in depth, not a RecursionError.
    with pytest.raises(
      torch_pickle.TorchFileError,
      match=rf"^{re.escape(path)}: containers nested deeper than 32 levels$",
    ):
      torch_pickle.load(path)
  assert not (tmp_path / "pwned").exists()


def test_the_command_lines_end_a_malformed_file_in_one_line_with_status_2(
  tmp_path, monkeypatch, capsys
):
  write_safetensors(tmp_path / "bad.safetensors", {"a": ENTRY, "b": ENTRY}, bytes(8))
  done = run_convert(
    tmp_path,
    "--source=diffusers",
    "--input=bad.safetensors",  # Relative.
    f"--config={REPO}/configs/digits.py",
    "--workdir=run",
  )
  assert done.returncode == 2, done.stderr[-3000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and re.fullmatch(  # Which of the two tensors is named varies.
    rf"error: {re.escape(str(tmp_path))}/bad\.safetensors: not a readable weights file "
    r"\(SafetensorError: Error while deserializing header: invalid offset for tensor `[ab]`\)",
    errors[0],
  ), done.stderr
  assert "Traceback" not in done.stderr and not (tmp_path / "run").exists()

  monkeypatch.chdir(tmp_path)
  evil_zip(tmp_path)
  assert convert_inception.main(["--input=evil.bin", "--output=out/o.npz"]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {tmp_path}/evil.bin: bad pickle: Refusing to load global ")
  assert err.count("\n") == 1 and not (tmp_path / "out").exists()
  assert not (tmp_path / "pwned").exists()


# -- What torch itself writes. -----------------------------------------------------------------


def test_a_state_dicts_metadata_is_dropped_and_build_refused_elsewhere(tmp_path):
  """torch pickles `state_dict()._metadata` with BUILD on the OrderedDict; BUILD on anything
  else (e.g. to change a tensor after its checks) is refused."""
  pickled = tensor_pickle([("w", "0", 2, 0, (2,), (1,))])[:-1]  # Without STOP.
  metadata = b"}" + pickle.BINUNICODE + struct.pack("<I", 9) + b"_metadata}s"
  values = np.array([1.5, -2.0], np.float32).tobytes()
  path = write_zip(
    tmp_path / "metadata.bin", {"data.pkl": pickled + metadata + b"b.", "data/0": values}
  )
  np.testing.assert_array_equal(torch_pickle.load_state_dict(path)["w"], [1.5, -2.0])
  mutate = b"(X\x01\x00\x00\x00wX\x01\x00\x00\x00wtb"  # BUILD ('w', 'w') on a tensor.
  evil = tensor_pickle([("w", "0", 2, 0, (2,), (1,))]).replace(b"tRu.", b"tR" + mutate + b"u.")
  assert mutate in evil
  path = write_zip(tmp_path / "build.bin", {"data.pkl": evil, "data/0": values})
  with pytest.raises(
    torch_pickle.TorchFileError,
    match=rf"^{re.escape(path)}: bad pickle: opcode "
    r"BUILD on an object other than an OrderedDict$",
  ):
    torch_pickle.load_state_dict(path)


# -- Dtypes. ------------------------------------------------------------------------------------


def tiny_state_dict(config, dtype) -> tuple[dict, dict]:
  """(diffusers state dict of random weights in `dtype`, our params of its values in float32)."""
  rng = np.random.default_rng(1)
  flat = {
    p: rng.normal(size=s.shape).astype(dtype) for p, s in matching.variable_shapes(config).items()
  }
  params = traverse_util.unflatten_dict({p: v.astype(np.float32) for p, v in flat.items()}, sep="/")
  unflat = traverse_util.unflatten_dict(flat, sep="/")
  return diffusers_weights.to_diffusers_state_dict(unflat), params


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_bfloat16_weights_are_read_and_integer_weights_refused(tmp_path, suffix):
  config = tiny_digits_config()
  state_dict, params = tiny_state_dict(config, ml_dtypes.bfloat16)
  path = str(tmp_path / f"bf16{suffix}")
  if suffix == ".bin":
    torch_writer.save_state_dict(path, state_dict)
  else:
    safetensors.numpy.save_file(state_dict, path)
  assert files.weights_header(path)["conv_in.weight"].dtype == ml_dtypes.bfloat16
  imported = convert.from_diffusers(convert.load_diffusers_state_dict(path, config), config)
  for p, value in traverse_util.flatten_dict(params, sep="/").items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(imported, sep="/")[p], value)

  state_dict["conv_out.bias"] = np.arange(1, dtype=np.int32)
  path = str(tmp_path / f"int{suffix}")
  if suffix == ".bin":
    torch_writer.save_state_dict(path, state_dict)
  else:
    safetensors.numpy.save_file(state_dict, path)
  with pytest.raises(
    convert.ConversionError,
    match=rf"^{re.escape(path)}: tensor "
    r"'conv_out\.bias' has dtype int32; U-Net weights are float16, bfloat16, "
    r"float32 or float64\.$",
  ):
    convert.load_diffusers_state_dict(path, config)


# -- Fuzzing: a few hundred mutants of small valid files. ---------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
INTERESTING_INTS = (
  0,
  1,
  -1,
  2,
  3,
  255,
  256,
  1 << 14,
  (1 << 31) - 1,
  -(1 << 31),
  1 << 32,
  1 << 62,
  1 << 63,
  -(1 << 63),
  10**30,
)


def fuzz_state_dict() -> dict:
  rng = np.random.default_rng(3)
  base = rng.normal(size=(3, 4)).astype(np.float32)
  return {
    "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
    "conv.bias": rng.normal(size=(4,)).astype(np.float32),
    "norm.weight": rng.normal(size=(4,)).astype(np.float16),
    "base": base,
    "base_t": base.T,  # A view: the zip and legacy files share the storage.
    "steps": np.array(7, np.int64),
    "empty": np.zeros((0, 3), np.float32),
  }


def truncate(data: bytes, rng) -> bytes:
  return data[: rng.randrange(len(data))]


def flip_bits(data: bytes, rng) -> bytes:
  out = bytearray(data)
  for _ in range(rng.randint(1, 8)):
    bit = rng.randrange(8 * len(out))
    out[bit // 8] ^= 1 << (bit % 8)
  return bytes(out)


def overwrite_bytes(data: bytes, rng) -> bytes:
  out = bytearray(data)
  for _ in range(rng.randint(1, 4)):
    out[rng.randrange(len(out))] = rng.choice(INTERESTING_BYTES)
  return bytes(out)


def encode_int(value: int) -> bytes:
  if 0 <= value < 256:
    return pickle.BININT1 + bytes([value])
  if -(1 << 31) <= value < 1 << 31:
    return pickle.BININT + struct.pack("<i", value)
  data = pickle.encode_long(value)
  return pickle.LONG1 + bytes([len(data)]) + data


def edit_ints(data: bytes, rng, start: int = 0) -> bytes:
  """Replaces 1-3 integer opcodes of the pickles from byte `start` on by interesting ints."""
  spans, stream = [], io.BytesIO(data)
  stream.seek(start)
  with_ints = ("BININT1", "BININT2", "BININT", "LONG1")
  while True:
    try:
      ops = list(pickletools.genops(stream))
    except Exception:  # noqa: BLE001 - past the pickles: raw storage bytes.
      break
    spans += [
      (pos, ops[i + 1][2]) for i, (op, _, pos) in enumerate(ops[:-1]) if op.name in with_ints
    ]
    if stream.tell() >= len(data):
      break
  out = data
  for begin, end in sorted(rng.sample(spans, min(len(spans), rng.randint(1, 3))), reverse=True):
    out = out[:begin] + encode_int(rng.choice(INTERESTING_INTS)) + out[end:]
  return out


def mutate_zip(data: bytes, rng) -> bytes:
  """The zip with its data.pkl edited, a record resized or dropped, or its byteorder changed;
  rewritten with correct CRCs so the pickle and the records are what gets tested."""
  with zipfile.ZipFile(io.BytesIO(data)) as archive:
    members = {name: archive.read(name) for name in archive.namelist()}
  pkl = next(name for name in members if name.endswith("data.pkl"))
  kind = rng.choice(["ints", "ints", "flip", "overwrite", "truncate", "record", "drop", "order"])
  if kind == "ints":
    members[pkl] = edit_ints(members[pkl], rng)
  elif kind in ("flip", "overwrite", "truncate"):
    members[pkl] = {"flip": flip_bits, "overwrite": overwrite_bytes, "truncate": truncate}[kind](
      members[pkl], rng
    )
  elif kind == "record":
    name = rng.choice([n for n in members if "/data/" in n])
    members[name] = members[name][:-4] if rng.random() < 0.5 else members[name] + bytes(4)
  elif kind == "drop":
    del members[rng.choice(sorted(members))]
  else:
    name = pkl.replace("data.pkl", "byteorder")
    members[name] = rng.choice([b"big", b"middle", b"", b"\xff\xfe", b"little" * 4])
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
    for name, value in members.items():
      archive.writestr(name, value)
  return out.getvalue()


def mutate_safetensors_header(data: bytes, rng) -> bytes:
  """The header's JSON edited (shapes, offsets, dtypes, names) or its length prefix lying."""
  (length,) = struct.unpack("<Q", data[:8])
  header, body = json.loads(data[8 : 8 + length]), data[8 + length :]
  name = rng.choice(sorted(k for k in header if k != "__metadata__"))
  entry, kind = header[name], rng.choice(["shape", "offsets", "dtype", "name", "length"])
  if kind == "shape":
    entry["shape"] = rng.choice(
      [
        [1 << 32, 1 << 32],
        [-1],
        [1.5],
        [],
        [0],
        [1 << 64],
        ["a"],
        entry["shape"][::-1],
        entry["shape"] + [1],
        [1 << 62, 4],
      ]
    )
  elif kind == "offsets":
    begin, end = entry["data_offsets"]
    other = header[rng.choice(sorted(k for k in header if k != "__metadata__"))]["data_offsets"]
    entry["data_offsets"] = rng.choice(
      [
        [0, 0],
        [begin, end + 1],
        [end, begin],
        list(other),
        [1 << 63, (1 << 63) + 4],
        [begin, 1 << 40],
        [-8, end],
        [float(begin), end],
      ]
    )
  elif kind == "dtype":
    entry["dtype"] = rng.choice(
      ["F16", "BF16", "F64", "I64", "U8", "BOOL", "C64", "F8_E4M3", "X32", 3]
    )
  elif kind == "name":
    header[name + "\n"] = header.pop(name)
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  prefix = len(raw)
  if kind == "length":
    prefix = rng.choice([0, 7, len(raw) - 8, len(raw) + 8, len(data), 1 << 63, (1 << 64) - 1])
  return struct.pack("<Q", prefix) + raw + body


def mutants(files: dict, seed: int, per_file: int) -> list[tuple[str, str, bytes]]:
  """[(base file kind, mutation, bytes)]: `per_file` of each base file, the same for a seed."""
  rng = random.Random(seed)
  generic = {"truncate": truncate, "flip": flip_bits, "overwrite": overwrite_bytes}
  specific = {
    "zip": mutate_zip,
    "safetensors": mutate_safetensors_header,
    "legacy": lambda data, r: edit_ints(data, r),
  }
  out = []
  for kind, data in files.items():
    for i in range(per_file):
      how = rng.choice(["truncate", "flip", "overwrite", "specific", "specific"])
      mutate = specific[kind] if how == "specific" else generic[how]
      out.append((kind, f"{how}_{i}", mutate(data, rng)))
  return out


def test_fuzzed_weight_files_load_correctly_or_end_in_one_line(tmp_path):
  state_dict = fuzz_state_dict()
  bases = {
    "zip": tmp_path / "base_zip.bin",
    "legacy": tmp_path / "base_legacy.bin",
    "safetensors": tmp_path / "base.safetensors",
  }
  torch_writer.save_state_dict(bases["zip"], state_dict)
  torch_writer.save_state_dict(bases["legacy"], state_dict, legacy_format=True)
  plain = {k: np.array(v, order="C") for k, v in state_dict.items()}  # 0-d stays 0-d.
  plain["bf16"] = np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  safetensors.numpy.save_file(plain, str(bases["safetensors"]))
  shapes = {k: list(v.shape) for k, v in plain.items()}
  expected = {  # What each reader is asked for: every tensor, names and shapes (and dtypes).
    "torch": {k: [list(v.shape), str(v.dtype)] for k, v in state_dict.items()},
    "torch_all": None,
    "weights": {k: shapes[k] for k in state_dict},
    "weights_header": None,
  }
  readers = {
    "zip": ["torch", "torch_all", "weights"],
    "legacy": ["torch", "torch_all"],
    "safetensors": ["weights", "weights_header"],
  }

  cases, kinds = [], []
  files = {kind: path.read_bytes() for kind, path in bases.items()}
  controls = [(kind, "control", data) for kind, data in files.items()]
  for i, (kind, how, data) in enumerate(controls + mutants(files, seed=2024, per_file=100)):
    path = tmp_path / f"{i:03d}_{kind}_{how}{'.safetensors' if kind == 'safetensors' else '.bin'}"
    path.write_bytes(data)
    for reader in readers[kind]:
      want = shapes if (kind, reader) == ("safetensors", "weights") else expected[reader]
      cases.append(
        {"path": str(path), "reader": reader.replace("torch_all", "torch"), "expected": want}
      )
      kinds.append((kind, how, reader))
  assert len({c["path"] for c in cases}) == 303

  run = run_readers(tmp_path, cases, memory=GIB, timeout=180)
  originals = {
    k: [list(v.shape), str(v.dtype), zlib.crc32(np.ascontiguousarray(v).tobytes())]
    for k, v in plain.items()
  }
  names = {"zip": sorted(state_dict), "legacy": sorted(state_dict), "safetensors": sorted(plain)}
  errors = {"zip": [], "legacy": [], "safetensors": []}
  loaded = 0
  for case, (kind, how, reader), result in zip(cases, kinds, run["results"], strict=True):
    assert result["outcome"] in ("ok", "error"), (case, result)
    assert result["seconds"] < 5, (case, result)
    if result["outcome"] == "error":
      message = result["message"]
      assert "\n" not in message and message.startswith(case["path"] + ": "), (case, message)
      assert "out of memory" not in message, (case, message)
      errors[kind].append(message[len(case["path"]) + 2 :])
      continue
    value = result["value"]
    if how == "control":  # The unmutated files: every tensor, exactly.
      want = (
        {k: originals[k][:2] for k in names[kind]}
        if reader == "weights_header"
        else {k: originals[k] for k in names[kind]}
      )
      assert value == want, (case, value)
      continue
    loaded += 1
    if case["expected"] is not None:  # A load succeeds only with the names, shapes (dtypes) asked.
      assert {k: v[0] for k, v in value.items()} == {
        k: s[0] if reader == "torch" else s for k, s in case["expected"].items()
      }, case
      if reader == "torch":
        assert {k: v[1] for k, v in value.items()} == {
          k: s[1] for k, s in case["expected"].items()
        }, case
  for kind, messages in errors.items():  # Most mutants are caught, by many different checks.
    assert len(messages) > 0.3 * sum(k == kind for k, _, _ in kinds), (kind, len(messages))
    assert len(set(messages)) > 20, (kind, sorted(set(messages)))
  joined = {kind: " | ".join(messages) for kind, messages in errors.items()}
  assert "Bad CRC-32" in joined["zip"] and "bad pickle" in joined["zip"]
  assert "is not an integer in [0, 2**62]" in joined["zip"] + joined["legacy"]
  assert "truncated" in joined["legacy"] and "overruns its storage" in joined["legacy"]
  assert "SafetensorError" in joined["safetensors"]
  assert loaded > 20  # Flips in raw tensor bytes (no checksum there) load, with other values.
  assert run["seconds"] < 60 and run["rss_growth"] < 512 * 1024, run
