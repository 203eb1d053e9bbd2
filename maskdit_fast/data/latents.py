"""VAE latent shards on disk: the format, its writer and its random-access reader.

A latent data set is a folder::

    meta.json            what is in it (below); written last, so its presence means "complete"
    classes.txt          class names, line i = label i (the sorted class folders of the image tree)
    shard-00000.tar      records, in POSIX ustar tar files of fixed-size records
    shard-00000.idx      the same shard's index in DALI's webdataset index format (v1.2)
    shard-00000.json     the shard's own summary (count, sha256, source files, unreadable images)
    unreadable.txt       images that could not be decoded (skipped), one "path<TAB>error" a line

**Records.** Record ``j`` of shard ``s`` is two tar members with the key ``f"{s:05d}-{j:07d}"``:

- ``KEY.lat``: the VAE posterior of one image, ``mean`` then ``logvar`` (diffusers'
  ``DiagonalGaussianDistribution``: ``logvar`` already clamped to [-30, 20]), each ``C x H x W``,
  C-order, little-endian ``dtype`` (float16 by default) -- i.e. an array ``(2, C, H, W)``, the
  "moments" layout of the official MaskDiT latents (``(2C, H, W)`` viewed another way);
- ``KEY.lbl``: the class label, one little-endian int32.

Every member header is a plain 512-byte ustar header (short names, no extensions, mtime 0) and
every data block is padded to 512 bytes, so each record has the same size
``record_bytes = 512 + pad512(latent_bytes) + 512 + 512`` (17,920 bytes for 4x32x32 fp16,
67,072 for 4x64x64) and record ``j`` starts at byte ``j * record_bytes``. A shard is exactly
``count * record_bytes + 1024`` bytes (the tar end-of-archive blocks). Hence:

- the PyTorch side memory-maps a shard as a ``(count, record_bytes)`` uint8 array and reads any
  record with one slice (no per-sample file open, no parsing);
- DALI reads the same files with its native ``fn.readers.webdataset`` (C++ reader, sharded by
  ``shard_id/num_shards``, shuffled, checkpointable), the ``.idx`` files sparing it the scan;
- ``tar tf shard-00000.tar`` or any webdataset tool can inspect them.

**Global order.** Sample ``i`` of the data set is record ``i - first[s]`` of the shard ``s`` with
``first[s] <= i < first[s] + count[s]`` (shards in name order). ``prepare`` writes the images in a
seeded random order, so a contiguous slice of the data set already mixes the classes (DALI shards
the data set into contiguous slices). With ``flip_copies`` each shard holds its ``n`` images as
records ``0..n-1`` and their horizontally flipped copies as records ``n..2n-1``.

**Training latent.** Each epoch draws a fresh sample of the posterior, as the official pipeline:
``x = latent_scale * (mean + exp(logvar / 2) * eps)``, eps ~ N(0, I).

**meta.json** keys: ``format`` ("maskdit_fast.latents"), ``version`` (1), ``count`` (records),
``images`` (source images encoded), ``shape`` ([C, H, W]), ``dtype``, ``posterior``
("mean_logvar"), ``latent_scale``, ``vae`` (hub id or path given to prepare), ``resolution``,
``flip_copies``, ``num_classes``, ``record_bytes``, ``latent_offset``, ``latent_bytes``,
``label_offset``, ``shards`` (list of {``file``, ``index``, ``count``, ``first``, ``images``,
``bytes``, ``sha256``}), ``seed`` (of the write order). See docs/data.md.

**Checks** (both loaders; docs/fault-tolerance.md, "Bad data"): :func:`shard_problem` at start (sizes
always; with ``data.verify`` every record, the sha256 and the index), :func:`parse_records` on every read.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

FORMAT = "maskdit_fast.latents"
VERSION = 1
BLOCK = 512
END_OF_ARCHIVE = 2 * BLOCK
LATENT_EXT, LABEL_EXT = "lat", "lbl"
DTYPES = {"float16": np.float16, "float32": np.float32}


class LatentFormatError(UserError):
    """A latent folder or shard that is missing, truncated or corrupted; the message names the file."""


def pad_block(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


@dataclass(frozen=True)
class RecordLayout:
    """Byte layout of one record for latents of ``shape`` (C, H, W) stored as ``dtype``."""
    shape: tuple[int, int, int]
    dtype: str = "float16"

    @property
    def latent_bytes(self) -> int:
        return 2 * int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize

    @property
    def latent_offset(self) -> int:
        return BLOCK

    @property
    def label_offset(self) -> int:
        return BLOCK + pad_block(self.latent_bytes) + BLOCK

    @property
    def record_bytes(self) -> int:
        return self.label_offset + BLOCK

    def shard_bytes(self, count: int) -> int:
        return count * self.record_bytes + END_OF_ARCHIVE


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def record_key(shard: int, record: int) -> str:
    return f"{shard:05d}-{record:07d}"


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")
    assert len(header) == BLOCK, name
    return header


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    _atomic_bytes(Path(path), (json.dumps(value, indent=1) + "\n").encode())


def index_line(shard: int, record: int, layout: RecordLayout) -> str:
    """Record ``record``'s line of a shard's DALI index: each member's extension, offset, size, name."""
    return _index_lines(shard, range(record, record + 1), layout)[0]


def _index_lines(shard: int, records: range, layout: RecordLayout) -> list[str]:
    size, lat_at, lbl_at, step = layout.latent_bytes, layout.latent_offset, layout.label_offset, layout.record_bytes
    return [f"{LATENT_EXT} {j * step + lat_at} {size} {shard:05d}-{j:07d}.{LATENT_EXT} "
            f"{LABEL_EXT} {j * step + lbl_at} 4 {shard:05d}-{j:07d}.{LABEL_EXT}" for j in records]


def index_text(shard: int, layout: RecordLayout, count: int) -> str:
    """The whole DALI index (webdataset v1.2) of a shard of ``count`` records."""
    return "".join([f"v1.2 {count}\n", *(line + "\n" for line in _index_lines(shard, range(count), layout))])


def write_shard(out_dir: Path, shard: int, layout: RecordLayout, posterior: np.ndarray, labels: np.ndarray,
                extra: dict | None = None) -> dict:
    """Write shard ``shard`` of ``out_dir`` atomically: the tar (``posterior`` (n, 2, C, H, W),
    ``labels`` (n,)), its DALI index and last its summary ``shard-XXXXX.json``, which marks it done.
    Returns the summary (``extra`` is merged into it)."""
    out_dir = Path(out_dir)
    n = len(labels)
    posterior = np.ascontiguousarray(posterior, dtype=np.dtype(DTYPES[layout.dtype]).newbyteorder("<"))
    if posterior.shape != (n, 2, *layout.shape):
        raise ValueError(f"posterior has shape {posterior.shape}, expected {(n, 2, *layout.shape)}")
    labels = np.asarray(labels, dtype="<i4")
    name = shard_name(shard)
    tar_path, tmp = out_dir / f"{name}.tar", out_dir / f".{name}.tar.tmp"
    lat_pad = b"\0" * (pad_block(layout.latent_bytes) - layout.latent_bytes)
    lbl_pad = b"\0" * (BLOCK - 4)
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        def put(data: bytes) -> None:
            f.write(data)
            digest.update(data)
        for j in range(n):
            key = record_key(shard, j)
            put(_tar_header(f"{key}.{LATENT_EXT}", layout.latent_bytes))
            put(posterior[j].tobytes())
            put(lat_pad)
            put(_tar_header(f"{key}.{LABEL_EXT}", 4))
            put(labels[j].tobytes())
            put(lbl_pad)
        put(b"\0" * END_OF_ARCHIVE)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, tar_path)
    _atomic_bytes(out_dir / f"{name}.idx", index_text(shard, layout, n).encode())
    summary = {"file": tar_path.name, "index": f"{name}.idx", "count": n, "bytes": layout.shard_bytes(n),
               "sha256": digest.hexdigest(), **(extra or {})}
    write_json(out_dir / f"{name}.json", summary)
    return summary


def shard_done(out_dir: Path, shard: int, layout: RecordLayout) -> dict | None:
    """The summary of a finished shard (its tar complete), else None."""
    summary_path = Path(out_dir) / f"{shard_name(shard)}.json"
    if not summary_path.is_file():
        return None
    summary = json.loads(summary_path.read_text())
    tar_path = Path(out_dir) / summary["file"]
    if not tar_path.is_file() or tar_path.stat().st_size != layout.shard_bytes(summary["count"]):
        return None
    return summary


def write_meta(out_dir: Path, layout: RecordLayout, summaries: list[dict], **fields) -> dict:
    """Assemble ``meta.json`` from the shard summaries (in shard order); written atomically, last."""
    shards, first = [], 0
    for s in summaries:
        shards.append({"file": s["file"], "index": s["index"], "count": s["count"], "first": first,
                       "images": s.get("images", s["count"]), "bytes": s["bytes"], "sha256": s["sha256"]})
        first += s["count"]
    meta = {"format": FORMAT, "version": VERSION, "count": first,
            "images": sum(s["images"] for s in shards), "shape": list(layout.shape), "dtype": layout.dtype,
            "posterior": "mean_logvar", **fields,
            "record_bytes": layout.record_bytes, "latent_offset": layout.latent_offset,
            "latent_bytes": layout.latent_bytes, "label_offset": layout.label_offset, "shards": shards}
    write_json(Path(out_dir) / "meta.json", meta)
    return meta


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        hint = " (prepare did not finish: run it again to complete it)" if any(path.glob("shard-*.json")) else ""
        raise LatentFormatError(f"{meta_path}: not found; data.path must be a folder written by "
                                f"python -m maskdit_fast.data.prepare{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise LatentFormatError(f"{meta_path}: not valid JSON ({err})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LatentFormatError(f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                                f"expected {FORMAT!r} version {VERSION}")
    return meta


EXPONENT_BITS = {2: 0x7C00, 4: 0x7F800000}  # IEEE binary16 / binary32 by item size
VERIFY_CHUNK = 1024  # records per read when a whole shard is checked (17 MB at 4x32x32 fp16)


def parse_records(rows: np.ndarray, shard: int, records: np.ndarray, layout: RecordLayout, num_classes: int
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, str] | None]:
    """Whole records ``rows`` (n, record_bytes) uint8, records ``records`` (n,) of shard ``shard`` ->
    (posterior (n, 2, C, H, W) in the stored dtype, labels (n,) int32, problem). ``problem`` is None or
    (position in ``rows``, what is wrong) for the first bad record: a tar header with another name, size
    or format than the writer's, a label outside 0..num_classes-1, or non-finite latent values."""
    n = len(rows)
    keys = np.frombuffer("".join(record_key(shard, int(j)) for j in records).encode(), np.uint8).reshape(n, -1)
    width = keys.shape[1]
    checks = []
    for ext, start, size in ((LATENT_EXT, 0, layout.latent_bytes), (LABEL_EXT, layout.label_offset - BLOCK, 4)):
        header, expected = rows[:, start:start + BLOCK], np.frombuffer(_tar_header(f"{'0' * width}.{ext}", size), np.uint8)
        ok = (header[:, :width] == keys).all(1)
        for a, b in ((width, 100), (124, 136), (257, 265)):  # rest of the name, size, magic and version
            ok &= (header[:, a:b] == expected[a:b]).all(1)
        checks.append((~ok, lambda i, ext=ext: f"its .{ext} tar header is not the expected one (name, size or format)"))
    dtype = np.dtype(DTYPES[layout.dtype]).newbyteorder("<")
    lat = rows[:, layout.latent_offset:layout.latent_offset + layout.latent_bytes]
    posterior = np.ascontiguousarray(lat).view(dtype).reshape(n, 2, *layout.shape)
    labels = np.ascontiguousarray(rows[:, layout.label_offset:layout.label_offset + 4]).view("<i4")[:, 0]
    checks.append(((labels < 0) | (labels >= max(num_classes, 1)),
                   lambda i: f"label {int(labels[i])} outside 0..{num_classes - 1}"))
    bits = posterior.reshape(n, -1).view(f"<u{dtype.itemsize}")
    exponent = EXPONENT_BITS[dtype.itemsize]  # all ones: inf or NaN (2.5x faster than np.isfinite on fp16)
    checks.append((((bits & exponent) == exponent).any(1), lambda i: "non-finite latent values"))
    bad = np.logical_or.reduce([b for b, _ in checks])
    if not bad.any():
        return posterior, labels, None
    first = int(np.argmax(bad))
    return posterior, labels, (first, next(reason for b, reason in checks if b[first])(first))


def fix_hint(file: Path) -> str:
    """What to do about a bad shard ``file``: re-encode it (prepare skips finished shards)."""
    return (f"delete {file.name} and {file.stem}.json in {file.parent} and run prepare again to re-encode the "
            f"shard (python -m maskdit_fast.data.latents verify {file.parent} checks every shard)")


def corrupted_record(file: Path, record: int, reason: str) -> LatentFormatError:
    """The error for a bad record found while reading (by the rank that reads it: ``local``)."""
    err = LatentFormatError(f"{file}: record {record} is corrupted ({reason}); {fix_hint(file)}")
    err.local = True
    return err


def shard_problem(folder: Path, meta: dict, shard: int, full: bool) -> str | None:
    """The first problem of shard ``shard`` of the latent folder ``folder`` (None: none found). Always
    (cheap): the tar and its DALI index exist and the tar has its exact size (a truncated shard names
    the first incomplete record). ``full`` (reads the shard): every record (:func:`parse_records`),
    the end-of-archive blocks, the sha256 against meta.json, and the index line by line."""
    layout = RecordLayout(tuple(meta["shape"]), meta["dtype"])
    entry, folder = meta["shards"][shard], Path(folder)
    file, index, count = folder / entry["file"], folder / entry["index"], entry["count"]
    if not file.is_file():
        return f"{file}: shard missing"
    size, expected = file.stat().st_size, layout.shard_bytes(count)
    if size != expected:
        where = (f"truncated: record {size // layout.record_bytes} is the first incomplete one" if size < expected
                 else "longer than its records")
        return (f"{file}: {size} bytes, expected {expected} ({count} records of {layout.record_bytes} bytes + "
                f"{END_OF_ARCHIVE}): {where}")
    if not index.is_file():
        return f"{index}: DALI index missing"
    if not full:
        return None
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for first in range(0, count, VERIFY_CHUNK):
            n = min(VERIFY_CHUNK, count - first)
            data = f.read(n * layout.record_bytes)
            digest.update(data)
            rows = np.frombuffer(data, np.uint8).reshape(n, layout.record_bytes)
            *_, problem = parse_records(rows, shard, np.arange(first, first + n), layout, meta["num_classes"])
            if problem is not None:
                return f"{file}: record {first + problem[0]} is corrupted ({problem[1]})"
        tail = f.read()
    digest.update(tail)
    if any(tail):
        return f"{file}: the end-of-archive blocks are not zero"
    if digest.hexdigest() != entry["sha256"]:
        return (f"{file}: sha256 {digest.hexdigest()} does not match meta.json ({entry['sha256']}): the shard is "
                "corrupted (its records are well-formed: changed values)")
    return index_problem(folder, meta, shard)


def index_problem(folder: Path, meta: dict, shard: int) -> str | None:
    """The first line of shard ``shard``'s DALI index that differs from what the writer wrote (None: none)."""
    entry = meta["shards"][shard]
    index = Path(folder) / entry["index"]
    if not index.is_file():
        return f"{index}: DALI index missing"
    layout = RecordLayout(tuple(meta["shape"]), meta["dtype"])
    found, wanted = index.read_text().splitlines(), index_text(shard, layout, entry["count"]).splitlines()
    if found == wanted:
        return None
    line = next((i for i, (a, b) in enumerate(zip(found, wanted)) if a != b), min(len(found), len(wanted)))
    what = "its header line" if line == 0 else f"the entry of record {line - 1}"
    return f"{index}: {what} is not the expected one (line {line + 1}: {(found + [''])[line]!r})"


class LatentShards:
    """Random access to a latent folder: ``read(indices)`` -> (posterior (n, 2, C, H, W), labels (n,)).

    Opening checks meta.json and every shard (:func:`shard_problem`: its size, so a truncated shard
    raises :class:`LatentFormatError` naming it and its first incomplete record; ``verify=True``: every
    record, the sha256 and the DALI index). Shards are memory-mapped lazily in each process (so the
    object pickles cheaply into DataLoader workers); every read checks the records it returns
    (:func:`parse_records`: tar headers, label, finite values) and names the first bad one.
    """

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.layout = RecordLayout(tuple(self.meta["shape"]), self.meta["dtype"])
        if self.layout.record_bytes != self.meta["record_bytes"]:
            raise LatentFormatError(f"{self.path / 'meta.json'}: record_bytes {self.meta['record_bytes']} does not "
                                    f"match shape {self.meta['shape']} {self.meta['dtype']} ({self.layout.record_bytes})")
        self.files = [self.path / s["file"] for s in self.meta["shards"]]
        self.counts = np.array([s["count"] for s in self.meta["shards"]], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)])
        if self.first[-1] != self.meta["count"]:
            raise LatentFormatError(f"{self.path / 'meta.json'}: shard counts add up to {self.first[-1]}, not "
                                    f"count={self.meta['count']}")
        for shard, file in enumerate(self.files):
            problem = shard_problem(self.path, self.meta, shard, full=verify)
            if problem is not None:
                raise LatentFormatError(f"{problem}; {fix_hint(file)}")
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layout.shape

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _map(self, shard: int) -> np.memmap:
        mm = self._maps.get(shard)
        if mm is None:
            mm = np.memmap(self.files[shard], dtype=np.uint8, mode="r", shape=(int(self.counts[shard]), self.layout.record_bytes))
            self._maps[shard] = mm
        return mm

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, record) of each global sample index."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        shard = np.searchsorted(self.first, indices, side="right") - 1
        return shard, indices - self.first[shard]

    def describe(self, indices) -> list[str]:
        """``FILE record J`` of each global sample index (to name the source of bad data)."""
        shards, records = self.locate(np.asarray(indices).reshape(-1))
        return [f"{self.files[s]} record {int(j)}" for s, j in zip(shards, records)]

    def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """posterior (n, 2, C, H, W) in the stored dtype, labels (n,) int64, in the order of ``indices``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        lay = self.layout
        posterior = np.empty((len(indices), 2, *lay.shape), dtype=DTYPES[lay.dtype])
        labels = np.empty(len(indices), dtype=np.int64)
        shards, records = self.locate(indices)
        for s in np.unique(shards):
            where = np.nonzero(shards == s)[0]
            rows = self._map(int(s))[records[where]]  # one gather of whole records
            post, found, problem = parse_records(rows, int(s), records[where], lay, self.meta["num_classes"])
            if problem is not None:
                raise corrupted_record(self.files[s], int(records[where][problem[0]]), problem[1])
            posterior[where] = post
            labels[where] = found
        return posterior, labels


# ------------------------------------------------------------------ posterior sampling

def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """(n,) uint64 seeds, one per sample: splitmix64 of (seed, epoch, sample index)."""
    def mix(z: np.ndarray) -> np.ndarray:
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
    with np.errstate(over="ignore"):
        key = mix(mix(np.array([seed & (2**64 - 1)], np.uint64)) ^ np.uint64(epoch & (2**64 - 1)))
        return mix(key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))


def posterior_noise(seed: int, epoch: int, indices, numel: int) -> torch.Tensor:
    """(n, numel) float32 standard normal noise on the CPU, a pure function of (seed, epoch, sample
    index): each sample's noise comes from its own generator seeded by :func:`sample_seeds`, so it
    does not depend on the batch the sample is in, the process that reads it, the global RNG or a
    resume."""
    indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices).reshape(-1)
    out = torch.empty(len(indices), numel)
    generator = torch.Generator()
    for row, s in zip(out, sample_seeds(seed, epoch, indices)):
        generator.manual_seed(int(s) >> 1)  # torch seeds are < 2**63
        torch.randn(numel, generator=generator, out=row)
    return out


def flip_coins(seed: int, epoch: int, indices) -> np.ndarray:
    """(n,) bool: a fair coin per sample, a pure function of (seed, epoch, sample index). It is the
    low bit of :func:`sample_seeds`, which :func:`posterior_noise` drops, so the two are independent."""
    indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices).reshape(-1)
    return (sample_seeds(seed, epoch, indices) & np.uint64(1)).astype(bool)


def sample_posterior(posterior: torch.Tensor, noise: torch.Tensor, scale: float) -> torch.Tensor:
    """posterior (n, 2, C, H, W) (mean, logvar), noise (n, C*H*W) -> scale * (mean + std * noise), float32."""
    mean, logvar = posterior.float().unbind(1)
    return scale * (mean + torch.exp(0.5 * logvar) * noise.view_as(mean))


def verify(path: str | Path) -> list[str]:
    """Check every shard of a latent folder (:func:`shard_problem` in full); returns the problems found."""
    meta = read_meta(path)
    problems = [shard_problem(Path(path), meta, s, full=True) for s in range(len(meta["shards"]))]
    return [p for p in problems if p is not None]


def main(argv: list[str] | None = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m maskdit_fast.data.latents",
                                     description="Inspect or verify a latent folder written by maskdit_fast.data.prepare")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print meta.json without the shard list").add_argument("path")
    sub.add_parser("verify", help="check every shard: size, every record, sha256, DALI index").add_argument("path")
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            meta = read_meta(args.path)
            print(json.dumps({k: v for k, v in meta.items() if k != "shards"} | {"shards": len(meta["shards"])}, indent=1))
            return 0
        problems = verify(args.path)
    except LatentFormatError as err:
        print(f"error: {err}")
        return 1
    for p in problems:
        print(p)
    print("ok" if not problems else f"{len(problems)} bad shard(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
