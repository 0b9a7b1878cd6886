"""Compact weight encodings (numpy only) and the tensor container that stores them.

A container (``.aiw``) is ``b"AIW1"``, a little-endian u32 header length, a JSON header and a
payload: the header lists each tensor's name, shape, per-codec metadata and its byte range. It
holds plain numbers only, so loading one can never execute code (no pickle anywhere).

Codecs turn one float32 array into (metadata, bytes) and back. A method that stores its weights
compactly registers a codec here; `compression.core.family` decodes it when the server loads the graph.
Codecs: ``dense`` (fp32), ``sparse`` (bitmap + values, pruned weights), ``kmeans-huffman``
(codebook + Huffman-coded indices and position gaps, Deep Compression) and ``binary`` (sign bits +
one scale per output channel, BinaryConnect).
"""

from __future__ import annotations

import bisect
import heapq
import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compression.core.errors import FamilyError

MAGIC = b"AIW1"

Meta = dict[str, Any]
Encoder = Callable[..., tuple[Meta, bytes]]
Decoder = Callable[[Meta, bytes, tuple[int, ...]], np.ndarray]

CODECS: dict[str, tuple[Encoder, Decoder]] = {}


def register_codec(name: str, encoder: Encoder, decoder: Decoder) -> None:
    CODECS[name] = (encoder, decoder)


def encode(codec: str, tensors: Mapping[str, np.ndarray], **options: Any) -> bytes:
    """Encode float32 tensors with one codec into a container."""
    enc, _ = _codec(codec, "encode")
    entries, chunks, offset = [], [], 0
    for name, array in tensors.items():
        array = np.asarray(array, dtype=np.float32)
        meta, data = enc(array, **options)
        entries.append({"name": name, "shape": list(array.shape), "offset": offset,
                        "length": len(data), "meta": meta})
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"codec": codec, "tensors": entries}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(chunks)


def decode(blob: bytes, *, source: str = "<bytes>") -> dict[str, np.ndarray]:
    """Decode a container back to float32 arrays; `FamilyError` names ``source`` on any damage."""
    if blob[:4] != MAGIC or len(blob) < 8:
        raise FamilyError(f"{source}: not a weight container (bad magic {blob[:4]!r})")
    (hlen,) = struct.unpack("<I", blob[4:8])
    try:
        header = json.loads(blob[8:8 + hlen])
        _, dec = _codec(header["codec"], "decode")
        payload = memoryview(blob)[8 + hlen:]
        out = {}
        for t in header["tensors"]:
            data = bytes(payload[t["offset"]:t["offset"] + t["length"]])
            if len(data) != t["length"]:
                raise FamilyError(f"{source}: tensor {t['name']!r} is truncated")
            shape = tuple(int(s) for s in t["shape"])
            out[t["name"]] = dec(t["meta"], data, shape).astype(np.float32).reshape(shape)
        return out
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise FamilyError(f"{source}: corrupt weight container ({exc})") from exc


def _codec(name: str, what: str) -> tuple[Encoder, Decoder]:
    if name not in CODECS:
        raise FamilyError(f"cannot {what} weights: unknown codec {name!r}; known: {sorted(CODECS)}")
    return CODECS[name]


# --- dense: raw float32 (a baseline and for tensors a codec should not touch) -----------------

def _dense_encode(a: np.ndarray) -> tuple[Meta, bytes]:
    return {}, a.astype("<f4").tobytes()


def _dense_decode(meta: Meta, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(shape)


# --- sparse: a presence bitmap (1 bit per weight) + the non-zero values in float32 ---------------
# At 90% sparsity this is 1/32 + 0.1 of dense, ~7.6x smaller; positions cost 1 bit, values 32.

def _sparse_encode(a: np.ndarray) -> tuple[Meta, bytes]:
    flat = a.reshape(-1)
    mask = flat != 0
    bitmap = np.packbits(mask)
    return {"nnz": int(mask.sum()), "bitmap_bytes": len(bitmap)}, \
        bitmap.tobytes() + flat[mask].astype("<f4").tobytes()


def _sparse_decode(meta: Meta, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    nb = int(meta["bitmap_bytes"])
    mask = np.unpackbits(np.frombuffer(data[:nb], dtype=np.uint8), count=size).astype(bool)
    values = np.frombuffer(data[nb:], dtype="<f4")
    if len(values) != int(meta["nnz"]) or int(mask.sum()) != len(values):
        raise ValueError("bitmap and value count disagree")
    out = np.zeros(size, dtype=np.float32)
    out[mask] = values
    return out.reshape(shape)


register_codec("dense", _dense_encode, _dense_decode)
register_codec("sparse", _sparse_encode, _sparse_decode)


# --- Huffman coding (canonical codes), used by the kmeans-huffman codec -------------------------
# Only the code lengths are stored; the codes themselves are rebuilt canonically on both sides
# (sorted by (length, symbol)), so a table costs one byte per alphabet symbol.

def huffman_code_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """Optimal prefix-code lengths (Huffman's algorithm) for symbol → count.

    A lone symbol gets length 0: its stream is empty and the decoder just repeats it.
    Ties are broken by symbol, so the result is deterministic.
    """
    items = sorted((int(c), int(s)) for s, c in counts.items() if c > 0)
    if not items:
        return {}
    if len(items) == 1:
        return {items[0][1]: 0}
    lengths = {s: 0 for _, s in items}
    heap: list[tuple[int, int, list[int]]] = [(c, i, [s]) for i, (c, s) in enumerate(items)]
    heapq.heapify(heap)
    tiebreak = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:  # every symbol under the merged node sinks one level deeper
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tiebreak, s1 + s2))
        tiebreak += 1
    return lengths


def canonical_codes(lengths: Mapping[int, int]) -> dict[int, int]:
    """Symbol → canonical code (as an int of ``lengths[symbol]`` bits)."""
    codes: dict[int, int] = {}
    code, prev = 0, 0
    for length, sym in sorted((ln, s) for s, ln in lengths.items()):
        code <<= length - prev
        codes[sym] = code
        code, prev = code + 1, length
    return codes


def huffman_encode(symbols: np.ndarray, lengths: Mapping[int, int]) -> bytes:
    """Concatenate the canonical codes of ``symbols`` (non-negative ints), MSB first, packed."""
    symbols = np.asarray(symbols, dtype=np.int64).reshape(-1)
    if len(symbols) == 0 or max(lengths.values(), default=0) == 0:
        return b""
    codes = canonical_codes(lengths)
    top = max(max(lengths), int(symbols.max())) + 1
    code_of = np.zeros(top, dtype=np.uint64)
    len_of = np.zeros(top, dtype=np.int64)
    for s, length in lengths.items():
        code_of[s], len_of[s] = codes[s], length
    if np.any(len_of[symbols] == 0):
        raise ValueError("symbol without a code in the Huffman table")
    c, ln = code_of[symbols], len_of[symbols]
    width = int(ln.max())
    j = np.arange(width)
    # bit j of each code, MSB first; positions past a code's length are dropped
    shift = np.clip(ln[:, None] - 1 - j[None, :], 0, None).astype(np.uint64)
    bits = ((c[:, None] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits[j[None, :] < ln[:, None]]).tobytes()


def huffman_decode(data: bytes, lengths: Mapping[int, int], count: int) -> np.ndarray:
    """Inverse of `huffman_encode`: ``count`` symbols from the packed stream."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if not lengths:
        raise ValueError("empty Huffman table for a non-empty stream")
    width = max(lengths.values())
    if width == 0:
        (sym,) = lengths
        return np.full(count, sym, dtype=np.int64)
    if width > 62:
        raise ValueError(f"Huffman code length {width} is too long")
    codes = canonical_codes(lengths)
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    # canonical codes, left-justified to `width` bits, increase along `order`: the code under a
    # window is the last start ≤ the window's value
    starts = [codes[s] << (width - lengths[s]) for s in order]
    syms = order
    lens = [lengths[s] for s in order]
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).astype(np.uint64)
    nbits = len(bits)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.uint64)])
    window = np.zeros(nbits, dtype=np.uint64)
    for j in range(width):
        window |= padded[j:j + nbits] << np.uint64(width - 1 - j)
    win = window.tolist()
    out = np.empty(count, dtype=np.int64)
    pos = 0
    for i in range(count):
        if pos >= nbits:
            raise ValueError("Huffman stream is truncated")
        k = bisect.bisect_right(starts, win[pos]) - 1
        out[i] = syms[k]
        pos += lens[k]
    if pos > nbits:
        raise ValueError("Huffman stream is truncated")
    return out


def _pack_table(lengths: Mapping[int, int], alphabet: int) -> bytes:
    """One byte per symbol 0..alphabet-1: 0 = absent, else code length + 1."""
    table = np.zeros(alphabet, dtype=np.uint8)
    for s, ln in lengths.items():
        if ln > 253:
            raise ValueError(f"code length {ln} does not fit the table")
        table[s] = ln + 1
    return table.tobytes()


def _unpack_table(data: bytes) -> dict[int, int]:
    table = np.frombuffer(data, dtype=np.uint8)
    return {int(s): int(table[s]) - 1 for s in np.flatnonzero(table)}


def _fixed_lengths(counts: Mapping[int, int]) -> dict[int, int]:
    """A fixed-width code for the present symbols (the "quantized, not yet Huffman" stage)."""
    present = [s for s, c in counts.items() if c > 0]
    width = int(np.ceil(np.log2(len(present)))) if len(present) > 1 else 0
    return {s: width for s in present}


# --- kmeans-huffman: Deep Compression storage -----------------------------------------------------
# A weight-shared tensor holds at most 256 distinct non-zero values. Stored: the codebook (float32),
# each non-zero's codebook index, and the positions as gaps (zeros since the previous non-zero);
# both symbol streams are Huffman-coded (or fixed-width with ``huffman=False``, for the report's
# stage table). A gap ≥ ``max_gap`` is split with filler symbols ``max_gap`` = "max_gap zeros, no
# value", so the gap alphabet stays small. Decoding gives back the exact float32 values.

MAX_CODEBOOK = 256


def _kmeans_huffman_encode(a: np.ndarray, huffman: bool = True,
                           max_gap: int = 32) -> tuple[Meta, bytes]:
    if not 1 <= max_gap <= 255:
        raise ValueError(f"max_gap must be in [1, 255], got {max_gap!r}")
    flat = a.reshape(-1)
    nz = np.flatnonzero(flat)
    codebook, idx = np.unique(flat[nz], return_inverse=True)
    if len(codebook) > MAX_CODEBOOK:
        raise ValueError(f"kmeans-huffman codec: tensor holds {len(codebook)} distinct non-zero "
                         f"values, at most {MAX_CODEBOOK} allowed (cluster the weights first)")
    gaps = np.diff(np.concatenate([[-1], nz])) - 1
    fillers = gaps // max_gap
    stream = np.full(int(fillers.sum()) + len(nz), max_gap, dtype=np.int64)
    stream[np.cumsum(fillers + 1) - 1] = gaps % max_gap
    code = huffman_code_lengths if huffman else _fixed_lengths
    idx_len = code(dict(zip(*np.unique(idx, return_counts=True), strict=True)))
    gap_len = code(dict(zip(*np.unique(stream, return_counts=True), strict=True)))
    idx_bytes = huffman_encode(idx, idx_len)
    gap_bytes = huffman_encode(stream, gap_len)
    meta = {"k": len(codebook), "nnz": len(nz), "ng": len(stream), "m": max_gap,
            "ib": len(idx_bytes), "gb": len(gap_bytes)}
    return meta, b"".join([codebook.astype("<f4").tobytes(), _pack_table(idx_len, len(codebook)),
                           _pack_table(gap_len, max_gap + 1), idx_bytes, gap_bytes])


def _kmeans_huffman_decode(meta: Meta, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    k, nnz, ng, m = int(meta["k"]), int(meta["nnz"]), int(meta["ng"]), int(meta["m"])
    ib, gb = int(meta["ib"]), int(meta["gb"])
    cuts = np.cumsum([4 * k, k, m + 1, ib, gb])
    if cuts[-1] != len(data):
        raise ValueError(f"payload is {len(data)} bytes, header says {int(cuts[-1])}")
    codebook = np.frombuffer(data[:cuts[0]], dtype="<f4")
    idx = huffman_decode(data[cuts[2]:cuts[3]], _unpack_table(data[cuts[0]:cuts[1]]), nnz)
    stream = huffman_decode(data[cuts[3]:cuts[4]], _unpack_table(data[cuts[1]:cuts[2]]), ng)
    # every symbol skips that many zeros; a non-filler symbol then places one value
    advance = stream + (stream < m)
    positions = (np.cumsum(advance) - 1)[stream < m]
    size = int(np.prod(shape))
    if len(positions) != nnz or (nnz and (positions[-1] >= size or idx.max() >= k)):
        raise ValueError("positions or indices do not fit the tensor")
    out = np.zeros(size, dtype=np.float32)
    out[positions] = codebook[idx]
    return out.reshape(shape)


# --- binary: BinaryConnect weights, sign bits + one float32 scale per output channel ------------
# After BN folding each output channel (dim 0) of a binarised layer still holds exactly ±a; the
# encoder checks that and refuses anything else, so a mistake can never be stored silently.

def _binary_encode(a: np.ndarray) -> tuple[Meta, bytes]:
    rows = a.reshape(a.shape[0], -1)
    mag = np.abs(rows)
    scale = mag.max(axis=1)
    bad = np.flatnonzero(~(mag == scale[:, None]).all(axis=1))
    if len(bad):
        row = int(bad[0])
        raise ValueError(f"binary codec: output channel {row} holds "
                         f"{len(np.unique(mag[row]))} distinct magnitudes, expected exactly one "
                         f"(±a); {len(bad)} of {len(rows)} channels are not binary")
    signs = np.packbits(rows.reshape(-1) < 0)
    return {"channels": len(rows)}, scale.astype("<f4").tobytes() + signs.tobytes()


def _binary_decode(meta: Meta, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    rows = int(meta["channels"])
    if rows != shape[0]:
        raise ValueError(f"{rows} scales for {shape[0]} output channels")
    size = int(np.prod(shape))
    scale = np.frombuffer(data[:4 * rows], dtype="<f4")
    neg = np.unpackbits(np.frombuffer(data[4 * rows:], dtype=np.uint8), count=size)
    if len(data) != 4 * rows + (size + 7) // 8:
        raise ValueError("sign bits do not fit the tensor")
    per = np.repeat(scale, size // rows)
    return np.where(neg.astype(bool), -per, per).reshape(shape)


register_codec("kmeans-huffman", _kmeans_huffman_encode, _kmeans_huffman_decode)
register_codec("binary", _binary_encode, _binary_decode)
