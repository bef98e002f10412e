"""What a solve's Hessian-vector products leave for the rest of a measurement.

Each R-operator product (``eosbranch.curvature.mlp.hvp``) passes its vector v through the first
layer once, R{z_1} = x V_1^T + c_1 (its one forward contact with the data), through each later
Linear (R{z_j}) and reaches the output tangent R{f}. All are linear in v. A Lanczos Ritz vector is
a combination of the vectors the solve multiplied, so its tangents are the same combination of the
recorded ones: the measurement's Taylor pass and per-example projections read them instead of
multiplying the data by v1's block again (``MLPBackend.tangents_along``, ``eosbranch.context.Context.tangents_v1``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ProductRecords", "RECORD_BYTES", "MAX_ROWS"]

# Memory the records of one operator may hold: each product keeps its input [dim] and its tangents
# ([N, width] per Linear, [N, C] at the output). An EoS solve of 4 products on the CIFAR-shaped
# MLP of benchmarks/measurement.py holds 62 MB at N = 2,000 and 194 MB at N = 10,000 (there the
# cap admits 5 products). A solve that would pass the cap first stops recording the later Linears'
# tangents (then MAX_ROWS = 8 products fit at N = 10,000: the Taylor pass multiplies by those
# weights itself), then stops recording (the passes then multiply the data themselves). While a
# buffer grows, old and new are both held for a moment.
RECORD_BYTES = 256 * 2**20
# At most this many recorded vectors: the least-squares test below costs about r^2 dim, which at 19
# products (a solve after a catapult, benchmarks/measurement.py, N = 2,000) exceeded the two data
# products it saves; at the 4 of an EoS solve it costs 0.1 gradient.
MAX_ROWS = 8
_COLUMNS = 2**16  # float64 column block of the least-squares problem


class ProductRecords:
    """Row buffers of the multiplied vectors ("inputs", [rows, dim]) and of each tangent
    (key -> [rows, N * width]), filled product by product while they fit in RECORD_BYTES and
    MAX_ROWS; past that, without the later Linears' tangents ("linear<j>", all rows of them); once even
    that does not fit, ``disabled`` and empty (a partial record cannot rebuild a vector of the
    span)."""

    def __init__(self):
        self.rows = 0
        self.disabled = False
        self._buf: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dropped: set[str] = set()  # tangents no longer recorded (the cap; ``add``)

    def _reserve(self, need: int, widths: dict[str, int], like: Tensor) -> bool:
        """Room for ``need`` rows of ``widths``; False (nothing changed) where they do not fit."""
        cap = 0 if not self._buf else self._buf["inputs"].shape[0]
        if need <= cap:
            return True
        row_bytes = sum(widths.values()) * like.element_size()
        most = min(RECORD_BYTES // row_bytes, MAX_ROWS)
        if need > most:
            return False
        cap = min(max(4, 2 * need), most)  # doubling: a long solve copies its records O(log) times
        grown = {k: torch.empty(cap, w, dtype=like.dtype, device=like.device) for k, w in widths.items()}
        for k, old in self._buf.items():
            grown[k][:self.rows] = old[:self.rows]
        self._buf = grown
        return True

    def add(self, tangents: list[Tensor], seen: dict[str, Tensor]) -> None:
        """One product: ``tangents`` per parameter [m, *shape] (its m vectors) and ``seen`` key ->
        [N, m, width] (``mlp.hvp``'s record). The vectors are copied: a solver reuses its rows."""
        if self.disabled:
            return
        seen = {k: t for k, t in seen.items() if k not in self._dropped}
        m = next(iter(tangents)).shape[0]
        widths = {"inputs": sum(t[0].numel() for t in tangents)}
        widths.update({k: t.shape[0] * t.shape[2] for k, t in seen.items()})
        if not self._reserve(self.rows + m, widths, seen["first"]):
            # Past the cap, the later Linears' tangents go first: they save products with those
            # weights only, the first-layer and output ones save products with the data.
            later = [k for k in seen if k.startswith("linear")]
            for k in later:
                self._dropped.add(k)
                del seen[k], widths[k]
                self._shapes.pop(k, None)
                self._buf.pop(k, None)
            if not later or not self._reserve(self.rows + m, widths, seen["first"]):
                self.disabled, self.rows, self._buf, self._shapes = True, 0, {}, {}
                return
        at, rows = 0, slice(self.rows, self.rows + m)
        for t in tangents:
            n = t[0].numel()
            self._buf["inputs"][rows, at:at + n] = t.reshape(m, n)
            at += n
        for k, t in seen.items():
            self._shapes[k] = (t.shape[0], t.shape[2])
            self._buf[k][rows] = t.transpose(0, 1).reshape(m, -1)
        self.rows += m

    def along(self, v: Tensor) -> dict[str, Tensor] | None:
        """key -> the tangent along the flat ``v`` ([N, width]), recombined from the records when v
        lies in the span of the multiplied vectors: the coefficients solve the least-squares
        problem, and the part of v outside the span must be within rounding (100 eps relative);
        else None."""
        if self.rows == 0:
            return None
        B = self._buf["inputs"][:self.rows]
        v = v.detach().reshape(-1).to(B.dtype)
        # Normal equations in float64, accumulated over column blocks (a float32 dot product over
        # millions of entries is good to ~1e-4 only, too coarse to tell a vector of the span from
        # one just outside it); the r x r system is solved on the host (gelsd copes with a
        # dependent row); the part of v outside the span is measured in float64 too.
        r, dim = B.shape
        G = torch.zeros(r, r, dtype=torch.float64, device=B.device)
        rhs = torch.zeros(r, dtype=torch.float64, device=B.device)
        for i in range(0, dim, _COLUMNS):
            Bi, vi = B[:, i:i + _COLUMNS].to(torch.float64), v[i:i + _COLUMNS].to(torch.float64)
            G += Bi @ Bi.T
            rhs += Bi @ vi
        coef = torch.linalg.lstsq(G.cpu(), rhs.cpu().unsqueeze(1), driver="gelsd").solution[:, 0].to(B.device)
        outside = torch.zeros((), dtype=torch.float64, device=B.device)
        for i in range(0, dim, _COLUMNS):
            Bi = B[:, i:i + _COLUMNS].to(torch.float64)
            outside += (v[i:i + _COLUMNS].to(torch.float64) - coef @ Bi).square().sum()
        if not bool(outside.sqrt() <= 100 * torch.finfo(B.dtype).eps * v.to(torch.float64).norm()):
            return None
        coef = coef.to(B.dtype)
        return {k: (coef @ self._buf[k][:self.rows]).reshape(shape) for k, shape in self._shapes.items()}
