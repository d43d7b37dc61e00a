"""Text normalization, shingling and fast MinHash signatures (datasketch's ``affine32`` scheme).

A document's similarity set is the set of its ``n``-token shingles. Tokens are runs of word
characters, except that every Han, Kana and Thai character is a token of its own: those scripts
are written without spaces, so a "word" would otherwise be a whole sentence. Text is folded first
(NFKC, case folding; whitespace and punctuation never reach a token) so that the same text
re-typed, re-cased or re-wrapped gives the same shingles.

Each shingle is hashed once to 32 bits: a polynomial hash per token computed with prefix sums on
the code point array, then a fixed mix of the ``n`` token hashes, vectorized with numpy over a
whole batch of documents. The signatures are then computed for all permutations at once as a
matrix operation that gives bit for bit what ``datasketch.MinHash(num_perm, seed,
scheme="affine32", hashfunc=shingle_hash32)`` gives when updated with the same shingles
(``reference_minhash`` builds that object; the tests compare the two).
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np
from datasketch import MinHash

# Scripts written without spaces between words: one character, one token.
_CHAR_TOKEN_SCRIPTS = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"[{_CHAR_TOKEN_SCRIPTS}]|[^\W{_CHAR_TOKEN_SCRIPTS}]+")
# Turkish dotted/dotless i: "İ".casefold() is "i" + a combining dot, and upper-cased "ı" is "I".
_TURKISH_I = ("İ", "ı")

_MIX = np.uint64(0x9E3779B97F4A7C15)  # golden-ratio multiplier used to chain token hashes
_U64 = (1 << 64) - 1
_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so invertible mod 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 1 << 64))
_FMIX64_M1, _FMIX64_M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)
_FMIX32_M1, _FMIX32_M2 = np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35)
HASH_SCHEME = "affine32"  # datasketch >= 2.0 scheme; fixed so signatures never change meaning silently
NORMALIZATION_VERSION = 1  # bump when fold_text/tokenization change: persistent indexes record it


def fold_text(text: str) -> str:
    """Case- and width-insensitive form of ``text`` (what shingles are made from)."""
    if not text.isascii():  # ASCII is already NFKC: skip the pass
        for letter in _TURKISH_I:  # str.replace is C-fast; str.translate with a table is not
            text = text.replace(letter, "i")
        text = unicodedata.normalize("NFKC", text)
    return text.casefold()


def tokenize(normalized: str) -> list[str]:
    return _TOKEN_RE.findall(normalized)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX64_M1
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX64_M2
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * _FMIX32_M1
    h = h ^ (h >> np.uint32(13))
    h = h * _FMIX32_M2
    return h ^ (h >> np.uint32(16))


@functools.cache
def _char_classes() -> np.ndarray:
    """Per code point: 0 not part of a token, 1 word character (``\\w``), 2 a token by itself."""
    classes = np.zeros(0x110000, dtype=np.uint8)
    classes[[i for i in range(0x110000) if chr(i).isalnum()]] = 1
    classes[ord("_")] = 1
    for low, high in re.findall("(.)-(.)", _CHAR_TOKEN_SCRIPTS):
        classes[ord(low) : ord(high) + 1] = 2
    return classes


@functools.cache
def _tables(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Character classes, and powers of the polynomial base and of its inverse (mod 2^64)."""
    with np.errstate(over="ignore"):
        powers = np.concatenate([[np.uint64(1)], np.cumprod(np.full(length - 1, _BASE, dtype=np.uint64))])
        inverse = np.concatenate(
            [[np.uint64(1)], np.cumprod(np.full(length - 1, _BASE_INV, dtype=np.uint64))]
        )
    return _char_classes(), powers, inverse


def _tokens(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, uint64 hash) of every token of a code point array, in order.

    A token's hash is its polynomial hash sum(ord(c) * BASE**j) mod 2**64, from prefix sums (no
    Python loop over tokens), mixed with its length. ``_token_hash`` is the same in pure Python.
    """
    if codes.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.uint64)
    size = 1 << max(16, int(codes.size - 1).bit_length())  # tables grow by powers of two, cached
    classes, powers, inverse = _tables(size)
    cls = classes[codes]
    word = cls != 0
    # A token starts at a token character that does not continue the previous one, and ends likewise.
    joins_next = (cls[:-1] == 1) & (cls[1:] == 1)
    starts = np.flatnonzero(word & np.concatenate([[True], ~joins_next]))
    ends = np.flatnonzero(word & np.concatenate([~joins_next, [True]])) + 1
    with np.errstate(over="ignore"):
        prefix = np.concatenate([[np.uint64(0)], np.cumsum(codes.astype(np.uint64) * powers[: codes.size])])
        poly = (prefix[ends] - prefix[starts]) * inverse[starts]
        return starts, ends, _fmix64(poly + (ends - starts).astype(np.uint64) * _MIX)


def line_keys(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per line of ``text``: a uint64 key of its folded tokens in order, and its number of tokens;
    (0, 0) for a line without tokens. Vectorized over the whole text.

    The same line re-cased, re-spaced or re-punctuated has the same key: what boilerplate detection
    counts. Numbers stay part of the key: without them, every "Django 1.9.3 release notes" title and
    every line of a directory listing would be one line.
    """
    folded = fold_text(text)
    if folded.count("\n") != text.count("\n"):  # NFKC never makes newlines; guard the line count anyway
        folded = "\n".join(fold_text(line) for line in text.split("\n"))
    codes = np.frombuffer(folded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts, _, hashes = _tokens(codes)
    lines = np.searchsorted(np.flatnonzero(codes == 10), starts)
    words = np.bincount(lines, minlength=folded.count("\n") + 1)
    position = np.arange(starts.size) - np.concatenate([[0], np.cumsum(words)])[lines]
    keys = np.zeros(words.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(keys, lines, _fmix64(hashes + position.astype(np.uint64) * _MIX))
        keys = _fmix64(keys + words.astype(np.uint64))
    keys[words == 0] = 0
    return keys, words


def token_hashes(text: str) -> np.ndarray:
    """uint64 hash of every token of ``text`` (already folded), in order."""
    return _tokens(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))[2]


def _token_hash(token: str) -> int:
    poly = 0
    for j, char in enumerate(token):
        poly = (poly + ord(char) * pow(int(_BASE), j, 1 << 64)) & _U64
    return _fmix64_int((poly + len(token) * int(_MIX)) & _U64)


def _fmix64_int(h: int) -> int:
    h ^= h >> 33
    h = (h * int(_FMIX64_M1)) & _U64
    h ^= h >> 33
    h = (h * int(_FMIX64_M2)) & _U64
    return h ^ (h >> 33)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the ``n``-token shingles of one folded text."""
    return batch_shingle_hashes([text], n)[1]


def batch_shingle_hashes(texts: list[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle sets of many folded texts at once: (offsets[len(texts) + 1], uint32 hashes).

    Document i's sorted unique hashes are ``hashes[offsets[i]:offsets[i + 1]]``. A document with
    fewer than ``n`` tokens has one shingle of all of them; one without tokens has none. The texts
    are joined by newlines (no token crosses one) and processed as one array.
    """
    codes = np.frombuffer("\n".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    starts, _, tokens = _tokens(codes)
    doc_starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    token_doc = np.searchsorted(doc_starts, starts, side="right") - 1
    per_doc = np.bincount(token_doc, minlength=len(texts))
    first_token = np.concatenate([[0], np.cumsum(per_doc)])
    with np.errstate(over="ignore"):
        count = max(tokens.size - n + 1, 0)
        chained = tokens[:count].copy()
        for k in range(1, n):
            chained = chained * _MIX + tokens[k : k + count]
        within = token_doc[:count] == token_doc[n - 1 : n - 1 + count]  # no shingle across documents
        hashes, owners = [chained[within]], [token_doc[:count][within]]
        for doc in np.flatnonzero((per_doc > 0) & (per_doc < n)):  # short documents: one shingle
            short = tokens[first_token[doc] : first_token[doc + 1]]
            h = short[:1].copy()
            for k in range(1, short.size):
                h = h * _MIX + short[k : k + 1]
            hashes.append(h)
            owners.append(np.array([doc]))
        hashes32 = _fmix64(np.concatenate(hashes)) >> np.uint64(32)
    keys = np.sort((np.concatenate(owners).astype(np.uint64) << np.uint64(32)) | hashes32)
    keys = keys[np.concatenate([keys[:1] == keys[:1], keys[1:] != keys[:-1]])]  # unique (empty-safe)
    offsets = np.searchsorted(keys >> np.uint64(32), np.arange(len(texts) + 1, dtype=np.uint64))
    return offsets, (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def shingle_hash32(shingle: bytes) -> int:
    """The hash of one shingle given as its tokens joined by NUL (pure Python, for datasketch).

    Same value as ``shingle_hashes`` computes vectorized; it is the ``hashfunc`` of the equivalent
    datasketch MinHash.
    """
    h = 0
    for i, token in enumerate(shingle.decode("utf-8").split("\0")):
        t = _token_hash(token)
        h = t if i == 0 else (h * int(_MIX) + t) & _U64
    return _fmix64_int(h) >> 32


def shingles_as_bytes(tokens: list[str], n: int) -> list[bytes]:
    """The shingles as datasketch input (tokens joined by NUL), for ``reference_minhash``."""
    if not tokens:
        return []
    width = min(n, len(tokens))
    return ["\0".join(tokens[i : i + width]).encode("utf-8") for i in range(len(tokens) - width + 1)]


class MinHasher:
    """All ``num_perm`` permutations of datasketch's affine32 scheme applied as one matrix op."""

    def __init__(self, num_perm: int, seed: int):
        self.num_perm = num_perm
        self.seed = seed
        a, b = MinHash(num_perm=num_perm, seed=seed, scheme=HASH_SCHEME).permutations
        self._a = a.astype(np.uint32)
        self._b = b.astype(np.uint32)

    def signature(self, hashes: np.ndarray) -> np.ndarray:
        """uint32[num_perm] signature of a set of 32-bit shingle hashes (all 0xFFFFFFFF if empty)."""
        return self.signatures(np.array([0, hashes.size]), hashes)[0]

    def signatures(self, offsets: np.ndarray, hashes: np.ndarray, chunk_rows: int = 8192) -> np.ndarray:
        """uint32[n_docs, num_perm] signatures of the shingle sets ``batch_shingle_hashes`` returns.

        The permutations x shingles matrix is built for about ``chunk_rows`` shingles at a time
        (a few MB) and reduced per document with ``np.minimum.reduceat``.
        """
        n_docs = offsets.size - 1
        out = np.full((n_docs, self.num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
        first = 0
        while first < n_docs:
            last = max(
                int(np.searchsorted(offsets, offsets[first] + chunk_rows, side="right")) - 1, first + 1
            )
            last = min(last, n_docs)
            starts = offsets[first:last]
            nonempty = offsets[first + 1 : last + 1] > starts
            if nonempty.any():
                # permutations x shingles, so that each document's shingles are contiguous per row
                matrix = np.multiply(
                    self._a[:, None], _fmix32(hashes[offsets[first] : offsets[last]])[None, :]
                )
                matrix += self._b[:, None]
                minima = np.minimum.reduceat(matrix, starts[nonempty] - offsets[first], axis=1)
                out[first:last][nonempty] = minima.T
            first = last
        return out

    def reference_minhash(self, shingles: list[bytes]) -> MinHash:
        """The datasketch MinHash these signatures equal (slow; tests and benchmarks)."""
        m = MinHash(num_perm=self.num_perm, seed=self.seed, scheme=HASH_SCHEME, hashfunc=shingle_hash32)
        for shingle in shingles:
            m.update(shingle)
        return m


@functools.cache
def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false positive and negative areas of the S-curve.

    Same criterion as datasketch.MinHashLSH, integrated numerically.
    """
    grid_low = np.linspace(0.0, threshold, 201)
    grid_high = np.linspace(threshold, 1.0, 201)
    best, best_error = (1, num_perm), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            fp = np.trapezoid(1 - (1 - grid_low**rows) ** bands, grid_low)
            fn = np.trapezoid((1 - grid_high**rows) ** bands, grid_high)
            error = fp_weight * fp + fn_weight * fn
            if error < best_error:
                best, best_error = (bands, rows), error
    return best


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64[n_docs, bands]: one hash per band of each signature row (equal band <=> equal key)."""
    sig = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.arange(1, bands + 1, dtype=np.uint64) * _MIX  # band number in the key: bands never collide
        for r in range(rows):
            h = _fmix64(h ^ sig[:, :, r])
    return h
