"""The NVIDIA DALI latent loader (``data.loader=dali``): the shards of ``data/latents.py`` read by
DALI's native webdataset reader, no Python on the per-sample path.

Pipeline (one per rank): ``fn.readers.webdataset`` (shard ``rank`` of ``world_size``, shuffle buffer
``data.shuffle_buffer``, seeded) -> raw bytes reinterpreted as (2, C, H, W) -> to the GPU ->
``scale * (mean + exp(logvar / 2) * eps)`` with ``eps = fn.random.normal`` -> random horizontal
flip (``data.flip``) -> the trainer, as torch tensors on its device. Without a GPU it runs in DALI's
CPU mode (``device_id=None``), as in the tests.

Order: the reader splits the data set itself into ``world_size`` contiguous slices (sizes differ by
at most one); rank r reads slice r, then r + 1, ... (mod world_size; ``stick_to_shard=False``), each
pass a new shuffle of the slice (the shuffle buffer drains at the end of a slice). A rank never
repeats or drops a sample within a pass, and every ``world_size`` passes it has read the whole data
set once; ``prepare`` stores the images in a random order so a slice is a random subset. When
``world_size`` divides the data set, each epoch is a permutation of it across the ranks; otherwise
the ranks cross slice boundaries up to one sample apart, so an epoch may read a boundary sample twice
or not at all while every ``world_size`` epochs read each sample ``world_size`` times. (The PyTorch
loader splits each global batch instead: exact for any size and number of processes.)

Checks, as the PyTorch loader's (docs/fault-tolerance.md, "Bad data"): the folder's at start
(``LatentShards``), then per micro-batch each sample's source (file and offsets of both members, which
only the index gives DALI), its label and finite values (a per-sample sum in the pipeline's CPU
threads); a bad record raises ``LatentFormatError`` naming the shard and record.

Resume: the pipeline's checkpoint (reader position, shuffle buffer and RNG states) is saved with
every training state, per rank, and restored on resume, so a resumed run reads exactly the
remaining samples. The state records what it is valid for (rank, number of processes, micro-batch,
data set size, seed, shuffle buffer, flips); if any of these changed the reader restarts with a
fresh seed and a warning says that the order is then not exact.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .latents import LatentFormatError, RecordLayout, corrupted_record, fix_hint, index_problem, record_key

log = logging.getLogger(__name__)


def dali_available() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no nvidia namespace package at all
        return False


def _require_dali():
    try:
        import nvidia.dali as dali
    except ImportError as err:
        raise RuntimeError("data.loader=dali needs NVIDIA DALI: pip install 'maskdit_fast[dali]' "
                           "(nvidia-dali-cuda120), or use data.loader=torch") from err
    return dali


class DaliLatentLoader:
    """Same interface as :class:`maskdit_fast.data.loader.LatentLoader` (see data/loader.py)."""

    def __init__(self, path: str | Path, meta: dict, micro: int, accumulation: int, rank: int, world_size: int,
                 seed: int, flip: bool, scale: float, device: torch.device, shuffle_buffer: int = 8192,
                 threads: int = 4):
        _require_dali()
        self.path, self.meta = Path(path), meta
        self.micro, self.accumulation, self.rank, self.world_size = micro, accumulation, rank, world_size
        self.seed, self.flips, self.scale, self.device = seed, flip, scale, device
        self.shuffle_buffer, self.threads = shuffle_buffer, threads
        self.vae = meta.get("vae")  # the VAE that encoded the latents
        self.first = np.concatenate([[0], np.cumsum([s["count"] for s in meta["shards"]])])
        self.layout = RecordLayout(tuple(meta["shape"]), meta["dtype"])
        self.shard_of = {str(self.path / s["file"]): i for i, s in enumerate(meta["shards"])}  # DALI's source paths
        if meta["count"] < world_size:
            raise ValueError(f"{path}: {meta['count']} samples cannot be split over {world_size} processes")
        # what a saved reader position is valid for
        self.key = {"rank": rank, "world_size": world_size, "micro": micro, "count": int(meta["count"]), "seed": seed,
                    "shuffle_buffer": shuffle_buffer, "flip": flip}
        self.pipe = None

    def __len__(self) -> int:
        return int(self.meta["count"])

    def _build(self, checkpoint: bytes | None, restart: int):
        from nvidia.dali import fn, pipeline_def, types
        import nvidia.dali.math as dmath

        c, h, w = self.meta["shape"]
        dtype = {"float16": types.FLOAT16, "float32": types.FLOAT}[self.meta["dtype"]]
        gpu = self.device.type == "cuda"
        seeds = np.random.SeedSequence([self.seed, self.rank, restart]).generate_state(2)
        shards = [s for s in self.meta["shards"] if s["count"]]  # the reader rejects empty tar files
        files = [str(self.path / s["file"]) for s in shards]
        index = [str(self.path / s["index"]) for s in shards]

        device_id = (torch.cuda.current_device() if self.device.index is None else self.device.index) if gpu else None

        @pipeline_def(batch_size=self.micro, num_threads=self.threads, device_id=device_id,
                      seed=int(seeds[0] % 2**31), enable_checkpointing=True, prefetch_queue_depth=2,
                      exec_dynamic=True)
        def pipeline():
            lat, lbl = fn.readers.webdataset(
                paths=files, index_paths=index, ext=["lat", "lbl"], shard_id=self.rank, num_shards=self.world_size,
                random_shuffle=True, initial_fill=self.shuffle_buffer, seed=int(seeds[1] % 2**31),
                stick_to_shard=False, pad_last_batch=False, missing_component_behavior="error", name="reader")
            info = fn.get_property(lat, key="source_info"), fn.get_property(lbl, key="source_info")
            post = fn.reinterpret(lat, dtype=dtype, shape=[2, c, h, w], layout="FCHW")
            label = fn.cast(fn.reinterpret(lbl, dtype=types.INT32, shape=[]), dtype=types.INT64)
            # per-sample sum on the CPU threads: finite iff every value is (fp16 values cannot overflow it)
            total = fn.reductions.sum(fn.cast(post, dtype=types.FLOAT))
            if gpu:
                post = post.gpu()
            mean, logvar = fn.cast(post[0], dtype=types.FLOAT), fn.cast(post[1], dtype=types.FLOAT)
            x = (mean + dmath.exp(logvar * 0.5) * fn.random.normal(mean)) * self.scale
            if self.flips:
                x = fn.flip(x, horizontal=fn.random.coin_flip())
            return x, label, total, *info

        pipe = pipeline(checkpoint=checkpoint) if checkpoint else pipeline()
        pipe.build()
        return pipe

    def start(self, step: int, max_steps: int, state: bytes | None = None) -> None:
        checkpoint = None
        if state is not None:
            header, _, checkpoint = bytes(state).partition(b"\n")
            saved = json.loads(header)
            if saved != self.key:
                changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in self.key.items() if saved.get(k) != v)
                log.warning("data.loader=dali: the saved reader position of rank %d is for another setup (%s): the "
                            "reader restarts with a fresh seed, the data order is not exact", self.rank, changed)
                checkpoint = None
        elif step > 0:
            log.warning("data.loader=dali: no reader position for rank %d in the checkpoint (another number of "
                        "processes, or another loader): the reader restarts with a fresh seed, the data order is "
                        "not exact", self.rank)
        self.pipe = self._build(checkpoint, restart=0 if checkpoint else step)

    def _index(self, lat_info, lbl_info) -> np.ndarray:
        """Global sample indices from the source infos ``path:offset:SSSSS-JJJJJJJ.ext`` of the two
        members; each member must come from its record's place in its shard (else the DALI index is
        corrupted: it alone tells the reader where the members are)."""
        lay, out = self.layout, []
        for i in range(len(lat_info)):
            (path, lat_at, key), (_, lbl_at, lbl_key) = (
                bytes(np.asarray(info[i])).decode().rsplit(":", 2) for info in (lat_info, lbl_info))
            shard = self.shard_of[path]
            record, rest = divmod(int(lat_at) - lay.latent_offset, lay.record_bytes)
            name = record_key(shard, record)
            if (rest, key, lbl_key, int(lbl_at)) != (0, f"{name}.lat", f"{name}.lbl",
                                                     record * lay.record_bytes + lay.label_offset):
                entry = self.meta["shards"][shard]
                err = LatentFormatError(f"{self.path / entry['index']}: the entry of {key} is corrupted (it points to "
                                        f"bytes {lat_at} and {lbl_at} of {entry['file']}, where {name} is not); "
                                        f"{fix_hint(self.path / entry['file'])}")
                err.local = True
                raise err
            out.append(self.first[shard] + record)
        return np.array(out, dtype=np.int64)

    def _run(self):
        """One micro-batch from the pipeline; a DALI failure caused by a corrupted index (a member of
        another size, which DALI cannot reinterpret) is reported as the index entry at fault."""
        try:
            return self.pipe.run()
        except RuntimeError as err:
            for shard in range(len(self.meta["shards"])):
                problem = index_problem(self.path, self.meta, shard)
                if problem is not None:
                    bad = LatentFormatError(f"{problem}; {fix_hint(self.path / self.meta['shards'][shard]['file'])}")
                    bad.local = True
                    raise bad from err
            raise

    def _check(self, idx: np.ndarray, labels: torch.Tensor, totals: np.ndarray) -> None:
        """Labels in range and finite latents, as the PyTorch loader checks each record it reads."""
        classes = self.meta["num_classes"]
        bad_label = ((labels < 0) | (labels >= max(classes, 1))).numpy()
        bad = bad_label | ~np.isfinite(totals)
        if bad.any():
            first = int(np.argmax(bad))
            shard = int(np.searchsorted(self.first, idx[first], side="right") - 1)
            reason = (f"label {int(labels[first])} outside 0..{classes - 1}" if bad_label[first]
                      else "non-finite latent values")
            raise corrupted_record(self.path / self.meta["shards"][shard]["file"], int(idx[first] - self.first[shard]),
                                   reason)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        """A DALI batch -> a torch tensor on the training device. As DALI's own PyTorch iterator does
        with the dynamic executor: DLPack shares DALI's buffer (kept alive by the tensor) and orders
        a GPU batch on torch's current stream."""
        from nvidia.dali.backend import TensorListGPU
        dense = tensor_list.as_tensor()
        if isinstance(tensor_list, TensorListGPU):
            with torch.cuda.device(self.device):
                return torch.from_dlpack(dense)
        return torch.from_dlpack(dense).to(self.device, non_blocking=True)

    def step(self, step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.pipe is None:
            raise RuntimeError("DaliLatentLoader.start(step, max_steps) must be called before step()")
        for a in range(self.accumulation):
            x, label, total, lat_info, lbl_info = self._run()
            idx = self._index(lat_info, lbl_info)
            labels = torch.from_dlpack(label.as_tensor())  # on the CPU: checked without a device sync
            self._check(idx, labels, np.asarray(total.as_tensor()))
            yield (self.rank * self.accumulation + a, torch.from_numpy(idx).to(self.device), self._to_torch(x),
                   labels.to(self.device, non_blocking=True))

    def state(self) -> bytes | None:
        """The reader position after the last step read: a JSON line saying what it is valid for,
        then DALI's pipeline checkpoint."""
        checkpoint = self.pipe.checkpoint()  # serialised protobuf: binary
        checkpoint = checkpoint.encode() if isinstance(checkpoint, str) else bytes(checkpoint)
        return json.dumps(self.key).encode() + b"\n" + checkpoint

    def describe(self, indices) -> list[str]:
        """``FILE record J`` of each global sample index (to name the source of bad data)."""
        shard = np.searchsorted(self.first, np.asarray(indices), side="right") - 1
        return [f"{self.path / self.meta['shards'][s]['file']} record {int(i - self.first[s])}"
                for s, i in zip(shard, np.asarray(indices))]

    def close(self) -> None:
        self.pipe = None
