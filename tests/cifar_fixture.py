"""Write a tiny CIFAR-10 copy in the real on-disk format, so tests read it through torchvision.

The real ``cifar-10-batches-py`` files are Python 2 pickles (protocol 2) of dicts whose keys and
strings are Python 2 ``str``: ``pickle.load(f, encoding="bytes")`` gives ``b"data"`` keys (the
official snippet) and ``encoding="latin1"`` gives ``"data"`` (what torchvision uses). Python 3's
pickler cannot write Python 2 strings, so this one writes every ``bytes`` object with the
``SHORT_BINSTRING``/``BINSTRING`` opcodes, as Python 2 did; both readings then work as on the
real files.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
               b"dog", b"frog", b"horse", b"ship", b"truck"]


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table we can extend
    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def _dump(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def write_tiny_cifar(root, n_per_batch: int = 40, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Pixels and labels are seeded random (labels uniform over 0..9), so each class turns up at
    irregular positions across batches — what a first-n-per-class-in-file-order test needs.
    Returns the batch folder.
    """
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        label = (b"testing batch 1 of 1" if name == "test_batch"
                 else f"training batch {i + 1} of 5".encode())
        _dump({
            b"batch_label": label,
            b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"tiny_{name}_{j}.png".encode() for j in range(n_per_batch)],
        }, folder / name)
    _dump({b"num_cases_per_batch": n_per_batch, b"label_names": LABEL_NAMES, b"num_vis": 3072},
          folder / "batches.meta")
    return folder
