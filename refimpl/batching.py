"""Several sequences in one forward pass, each getting the same bits as if it ran alone.

A forward call stacks the new tokens of B sequences into one [N, D] matrix, so that every weight
is read once per step for all of them; only attention needs to know which rows belong to which
sequence, and each sequence attends to its own KV cache. A family calls `linear` (ops.py), which
multiplies through `Batch.matmul`, and `attend` with its projected q, k, v: it never sees a span
or a cache.

Batch invariance. A request's answer must not depend on what else runs beside it. Floating-point
sums depend on their order, and a BLAS matrix product picks its kernel, blocking and order from
the shape of the call: measured with this machine's OpenBLAS, row 0 of `X @ W` comes out in
different bits for 1, 7, 16 or 256 rows, and a row's bits even depend on where it sits in a
32-row product. So no row is ever computed in a call whose shape depends on the batch:

  - a decoding row (one generated token of a sequence) is multiplied alone: a matrix-vector
    product per row (`rowwise_matmul`), the same call whatever else is in the step;
  - a prompt row at position p goes to slot p mod TILE of a TILE-row product: prompt rows of any
    sequences fill tiles slot by slot, empty slots are zero rows. Its product has the same shape
    and the row the same slot however the prompt was cut into chunks or whatever shares the step,
    and a row's result never depends on the values of the other rows of a product;
  - each sequence attends to its own cache: a prompt's queries in blocks of KEY_BLOCK positions
    aligned to multiples of it, where a query's row has a place and a shape fixed by its position
    (ops.attention); a decoding query over exactly the keys it sees (ops.decode_attention);
  - everything else (norms, activations, RoPE, softmax, sampling) works row by row already, on
    row-major arrays: NumPy sums the rows of a transposed view in another order (layout.embed).

The one assumption is that BLAS is deterministic: the same call on the same data gives the same
bits, which holds for OpenBLAS on a CPU with a fixed number of threads. A GPU (CuPy, cuBLAS) runs
the same calls, but its batched products promise no invariance.

Dimension letters as in ops.py; B sequences.
"""

from dataclasses import dataclass

import numpy as np

from refimpl.ops import attention, decode_attention, rowwise_matmul
from refimpl.xp import to_numpy

# Rows of a prompt tile. Measured on the default model's block matrices (2 cores, OpenBLAS), 256
# prompt rows: in 16-row tiles they took 2.0x the time of one 256-row product, in 32-row tiles
# 1.4x. Larger tiles cost a short prompt more empty rows (a 40-token chat prompt fills 2 tiles).
TILE = 32


@dataclass
class Batch:
    xp: object  # the array namespace
    spans: list  # (lo, hi, cache): rows lo..hi-1 of the call are that sequence's new tokens
    ids: object  # [N] the new token ids of every sequence, one after another
    positions: object  # [N] each row's position in its sequence
    products: "Products"  # how the N rows are multiplied

    @classmethod
    def of(cls, xp, tokens, caches):
        """The batch of one forward call: tokens is one list of new ids per sequence, caches their KVCaches."""
        spans, positions, decoding, lo = [], [], [], 0
        for ids, cache in zip(tokens, caches, strict=True):
            spans.append((lo, lo + len(ids), cache))
            at = np.arange(cache.length, cache.length + len(ids))
            positions.append(at)
            decoding.append(np.array([cache.decodes(p) for p in at], dtype=bool))
            lo += len(ids)
        positions = np.concatenate(positions)
        ids = xp.asarray([t for seq in tokens for t in seq], dtype=xp.int64)
        return cls(xp, spans, ids, xp.asarray(positions), Products.of(xp, positions, np.concatenate(decoding)))

    def matmul(self, x, w):
        """x [N, K] @ w [K, M], each row computed the same way in any batch (see Products)."""
        return self.products.matmul(x, w)

    def logits(self, x, lm_head, all_logits):
        """The output head on the final-normalised rows x [N, D]: for each sequence, its last row,
        which alone predicts its next token, or all its rows (scoring a prompt) when `all_logits`
        says so (True, False, or one bool per sequence). Rows in order: [B, V], [N, V], or between."""
        every = all_logits if isinstance(all_logits, list) else [all_logits] * len(self.spans)
        # A row that predicts a generated token (a sequence's last) is multiplied alone, whether or
        # not its prompt is scored and whatever else is: the first token is the same bits with echo.
        positions, rows, alone = to_numpy(self.positions), [], []
        for (lo, hi, cache), every_row in zip(self.spans, every):
            picked = list(range(lo, hi)) if every_row else [hi - 1]
            rows += picked
            alone += [not every_row or cache.decodes(positions[r] + 1) for r in picked]
        x = self.xp.take(x, self.xp.asarray(np.array(rows, dtype=np.int64)), axis=0)
        return Products.of(self.xp, positions[rows], np.array(alone)).matmul(x, lm_head)

    def record(self, layer, x):
        """Hand the residual stream x [N, D] entering block `layer` (layer L: after the last block)
        to the probe of each sequence that carries one (refimpl/inspection.py); nothing otherwise."""
        for lo, hi, cache in self.spans:
            if cache.probe is not None:
                cache.probe.residual(layer, x[lo:hi, ...])

    def advance(self):
        """After the last layer: each cache now holds its new tokens."""
        for lo, hi, cache in self.spans:
            cache.length += hi - lo


@dataclass
class Products:
    """How the rows of one call are multiplied by a weight matrix: each row alone (matrix-vector),
    or in slot (position mod TILE) of a TILE-row product."""

    xp: object
    alone: object  # [Na] the rows multiplied one at a time
    tiled: object  # [n_tiles * TILE] the row at each slot of the tiles; R (one past the last row): empty
    order: object  # [R] where each row's product is in concat(tile rows, rows alone)

    @classmethod
    def of(cls, xp, positions, alone):
        """positions [R] of the rows; alone [R] True where a row is multiplied alone (NumPy arrays)."""
        R = len(positions)
        rows = np.flatnonzero(~alone)
        # A row's slot is its position mod TILE, its tile the first one whose slot is still free.
        slots = positions[rows] % TILE
        tile = np.zeros(len(rows), dtype=np.int64)
        taken = [0] * TILE
        for i, slot in enumerate(slots):
            tile[i], taken[slot] = taken[slot], taken[slot] + 1
        tiled = np.full(max(taken) * TILE, R, dtype=np.int64)
        tiled[tile * TILE + slots] = rows
        order = np.empty(R, dtype=np.int64)
        order[rows] = tile * TILE + slots
        order[alone] = len(tiled) + np.arange(int(alone.sum()))
        return cls(xp, xp.asarray(np.flatnonzero(alone)), xp.asarray(tiled), xp.asarray(order))

    def matmul(self, x, w):
        """x [R, K] @ w [K, M]."""
        xp, K, M = self.xp, x.shape[1], w.shape[1]
        if self.tiled.shape[0] == 0:  # every row alone, in order
            return rowwise_matmul(xp, x, w)
        parts = []
        padded = xp.concat([x, xp.zeros((1, K), dtype=x.dtype)], axis=0)  # row R: zeros for empty slots
        tiles = xp.reshape(xp.take(padded, self.tiled, axis=0), (-1, TILE, K))
        parts.append(xp.reshape(tiles @ w, (-1, M)))  # one TILE-row product per tile
        if self.alone.shape[0]:
            parts.append(rowwise_matmul(xp, xp.take(x, self.alone, axis=0), w))
        return xp.take(xp.concat(parts, axis=0), self.order, axis=0)  # [R, M], rows back in order


def attend(xp, batch, layer, q, k, v, window, scale=None, softcap=None):
    """Write each sequence's new keys and values k, v [N, Hkv, Dh] into its cache at `layer`, then
    attend its queries q [N, H, Dh] to everything its cache holds; returns [N, H*Dh].
    `scale` and `softcap` as in ops.attention (None: 1/sqrt(Dh), no cap).

    Each sequence attends to its own cache: a prompt's queries in aligned blocks (ops.attention),
    a decoding query over exactly the keys it sees (ops.decode_attention).
    """
    outs = []
    for lo, hi, cache in batch.spans:
        start = cache.length
        keys, values = cache.write(xp, layer, start, k[lo:hi, ...], v[lo:hi, ...])
        if cache.probe is not None:  # looking inside (inspection.py): the same queries and keys
            cache.probe.attention(layer, q[lo:hi, ...], keys[:, :start + hi - lo, :], start, window, scale, softcap)
        if cache.decodes(start):  # a generated token
            outs.append(decode_attention(xp, q[lo:hi, ...], keys, values, start, window, scale, softcap))
        else:
            outs.append(attention(xp, q[lo:hi, ...], keys, values, start, window, scale, softcap))
    return outs[0] if len(outs) == 1 else xp.concat(outs, axis=0)  # [N, H*Dh]
