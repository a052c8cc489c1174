"""Training batches streamed from the packed dataset (pipeline/pack.py), with exact resume.

The global batch of `train.batch_size` pairs is the concatenation of `train.streams` lane batches. Lane l
reads, epoch after epoch, the shards at places l, l+streams, … of a seeded permutation of the shards (a new
one each epoch), cuts its endless sequence of pairs into blocks of `train.shuffle_block` and emits each block
in a seeded order (blocks never cross an epoch: no pair twice in one). So the pair at any lane position is a
pure function of (seed, streams, the shard sizes), and step s of lane l is lane positions [s·b, (s+1)·b),
b = batch_size / streams: resuming at step s reopens one shard at a row and re-reads at most one block. Workers (Ray Train ranks) take contiguous lanes; each
worker's loader processes take contiguous lanes of those, decode, augment and tokenise, and hand over one
item per step in turn. Memory: one block of encoded pairs per lane, plus the prefetched batches."""
from __future__ import annotations

import os
import signal
import unicodedata
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from cidistill.core.errors import StageError
from cidistill.core.images import decode_rgb
from cidistill.core.packed import image_member, iter_tar_samples, sample_fields, split_shards
from cidistill.core.store import Store
from .data import augment, standardise


@dataclass
class StreamSpec:
    """What fixes the batch sequence (no worker or loader count in it)."""
    root: str                            # the packed split's parent folder (pack/ or a teacher's pack)
    split: str
    shards: list[tuple[str, int]]        # (tar name, pairs)
    streams: int
    batch_size: int
    block: int
    seed: int

    @property
    def lane_batch(self) -> int:
        return self.batch_size // self.streams

    @classmethod
    def of(cls, root: str, split: str, tc) -> "StreamSpec":
        shards = split_shards(Store(root), split)
        if not shards:
            raise StageError(f"no packed {split} shards in {root}: run `cidistill pack` first")
        if len(shards) < tc.streams:
            raise StageError(f"the packed {split} split has {len(shards)} shard(s), fewer than train.streams="
                             f"{tc.streams}: lower pack.samples_per_shard or train.streams")
        return cls(root, split, shards, tc.streams, tc.batch_size, tc.shuffle_block, tc.seed)

    def check_batch(self) -> None:
        """A batch holds no pair twice (each its own negative in the contrastive losses). A stream reads
        floor(shards / streams) shards or more an epoch: its batch must fit in the fewest pairs."""
        fewest = sum(sorted(n for _, n in self.shards)[:len(self.shards) // self.streams])
        if self.lane_batch > fewest:
            raise StageError(f"train.batch_size={self.batch_size} is more than the packed {self.split} split fills "
                             f"without a pair twice in a batch (its own negative): {self.pairs} pairs in "
                             f"{len(self.shards)} shard(s), as {self.streams} stream(s) of {fewest} or more; lower "
                             "train.batch_size")

    @property
    def pairs(self) -> int:
        return sum(n for _, n in self.shards)


def lane_shards(spec: StreamSpec, lane: int, epoch: int) -> list[tuple[str, int]]:
    order = np.random.default_rng([spec.seed, epoch, 17]).permutation(len(spec.shards))
    return [spec.shards[i] for i in order[lane::spec.streams]]


def lane_epoch_at(spec: StreamSpec, lane: int, pos: int) -> tuple[int, int, list[tuple[str, int]]]:
    """(epoch, offset in that epoch, the epoch's shards) of lane position `pos`."""
    epoch, start = 0, 0
    while True:
        shards = lane_shards(spec, lane, epoch)
        count = sum(n for _, n in shards)
        if pos < start + count:
            return epoch, pos - start, shards
        epoch, start = epoch + 1, start + count


def shard_at(shards: list[tuple[str, int]], offset: int) -> tuple[int, int]:
    """(index of the shard, row in it) of an offset into a list of shards."""
    for i, (_, n) in enumerate(shards):
        if offset < n:
            return i, offset
        offset -= n
    raise IndexError(offset)


def data_position(spec: StreamSpec, step: int) -> list[dict]:
    """Where each lane stands before `step`: what a checkpoint records (and a resume reopens)."""
    out = []
    for lane in range(spec.streams):
        epoch, offset, shards = lane_epoch_at(spec, lane, step * spec.lane_batch)
        block = offset // spec.block
        i, row = shard_at(shards, block * spec.block)
        out.append({"lane": lane, "epoch": epoch, "shard": shards[i][0], "row": row, "block": block,
                    "in_block": offset - block * spec.block, "block_seed": [spec.seed, lane, epoch, block]})
    return out


def epoch_raw(store: Store, shards: list[tuple[str, int]], start: int) -> Iterator[dict[str, bytes]]:
    i, row = shard_at(shards, start)
    for j in range(i, len(shards)):
        yield from iter_tar_samples(store, shards[j][0], row if j == i else 0)


def lane_samples(spec: StreamSpec, lane: int, start: int) -> Iterator[dict[str, bytes]]:
    """Raw samples of lane `lane` from lane position `start` on. An epoch's pairs are cut into blocks (never
    across epochs, so that a block holds no pair twice), each read whole and emitted in a seeded order."""
    store, k = Store(spec.root), spec.block
    epoch, offset, shards = lane_epoch_at(spec, lane, start)
    while True:
        count = sum(n for _, n in shards)
        first = offset // k
        src = epoch_raw(store, shards, first * k)
        for block in range(first, -(-count // k)):
            held = [next(src) for _ in range(min(k, count - block * k))]
            order = np.random.default_rng([spec.seed, lane, epoch, block]).permutation(len(held))
            for i in order[offset - block * k if block == first else 0:]:
                yield held[i]
        epoch, offset = epoch + 1, 0
        shards = lane_shards(spec, lane, epoch)


# ftfy's width fix (NFKC) of full-width ASCII, without `＆`: it would become an `&` for html unescaping
FULL_WIDTH = {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFF5F) if i != 0xFF06}


def _plain(o: int) -> bool:
    """Characters ftfy leaves alone or only narrows: printable ASCII but `&`, CJK ideographs, 、。, full width."""
    return (32 <= o < 127 and o != 38) or 0x4E00 <= o <= 0x9FFF or o in (0x3001, 0x3002) or o in FULL_WIDTH


class BackendTokenizer:
    """open_clip's HFTokenizer (whitespace cleaning, plain mode) run on its Rust tokenizer directly: the same ids
    for ~60 % of the time (13-15 vs 21-24 ms per demo batch of 128 EN + ZH captions; transformers' batch wrapper
    and ftfy on every caption were the rest). Captions of printable ASCII without `&`, CJK ideographs, 、。 and
    full-width forms skip ftfy (32 vs 4 us a Chinese caption) and html unescaping, which change nothing there
    but the full-width forms (the same as the wrapper's cleaning on 30,000 random strings of them)."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        fast, n = tokenizer.tokenizer, tokenizer.context_length
        self.clean_fn = tokenizer.clean_fn
        self.backend = Tokenizer.from_str(fast.backend_tokenizer.to_str())
        self.backend.enable_truncation(n)
        self.backend.enable_padding(length=n, pad_id=fast.pad_token_id, pad_token=fast.pad_token)

    @staticmethod
    def of(tokenizer) -> Callable:
        """The backend path where it gives the wrapper's ids, else the tokenizer itself."""
        try:
            from open_clip.tokenizer import HFTokenizer, get_clean_fn
            from transformers import PreTrainedTokenizerFast
        except ImportError:
            return tokenizer
        fast = getattr(tokenizer, "tokenizer", None)
        if (type(tokenizer) is HFTokenizer and not tokenizer.tokenizer_mode and not tokenizer.strip_sep_token
                and tokenizer.clean_fn is get_clean_fn("whitespace") and isinstance(fast, PreTrainedTokenizerFast)
                and fast.padding_side == "right" and fast.truncation_side == "right" and tokenizer.context_length):
            return BackendTokenizer(tokenizer)
        return tokenizer

    def clean(self, text: str) -> str:
        if text.isascii():
            if text.isprintable() and "&" not in text:
                return " ".join(text.split())
        elif all(_plain(o) for o in map(ord, text)):  # ftfy changes only full-width forms here
            return " ".join(text.translate(FULL_WIDTH).split())
        return self.clean_fn(text)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        encoded = self.backend.encode_batch([self.clean(t) for t in texts])
        return torch.tensor([e.ids for e in encoded], dtype=torch.long)


@dataclass
class BatchMaker:
    """Turns a lane group's raw samples into the tensors of a train step (runs in the loader processes)."""
    image_size: int
    mean: tuple
    std: tuple
    tokenizer: Callable
    old2new: torch.Tensor | None       # trimmed vocabulary's id map
    use_zh: bool
    augment: bool
    style: bool
    seed: int

    def tokens(self, texts: list[str]) -> torch.Tensor:
        t = self.tokenizer(texts)
        return self.old2new[t] if self.old2new is not None else t

    def __call__(self, samples: list[dict[str, bytes]], step: int, offset: int, total: int) -> dict:
        fields = [sample_fields(s) for s in samples]
        imgs = np.stack([decode_rgb(image_member(s), self.image_size) for s in samples])
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255)
        if self.augment:  # each row's warp is drawn for the global batch: any split into workers sees the same
            x = augment(x, torch.Generator().manual_seed(self.seed * 7919 + step * 31), offset=offset, total=total,
                        style=self.style)
        caps = [f["caption"] for f in fields]
        item = {"step": step, "x": standardise(x, self.mean, self.std), "tokens": self.tokens(caps),
                "keys": [f["key"] for f in fields]}
        if self.use_zh:
            item["tokens_zh"] = self.tokens([f["caption_zh"] or c for f, c in zip(fields, caps)])
            item["has_zh"] = torch.tensor([bool(f["caption_zh"]) for f in fields])
        for name in ("t_img", "t_txt"):
            if name in fields[0]:
                item[name] = torch.from_numpy(np.stack([f[name] for f in fields]).astype(np.float32))
        if "cluster_id" in fields[0]["meta"]:
            item["cluster_id"] = torch.tensor([f["meta"]["cluster_id"] for f in fields], dtype=torch.long)
        return item


class LaneGroup(torch.utils.data.IterableDataset):
    """Items of lanes first..first+count-1 (concatenated in lane order), one per step from `start_step`.
    As a DataLoader dataset each loader process takes its own contiguous share of the lanes."""

    def __init__(self, spec: StreamSpec, make: BatchMaker, first: int, count: int, start_step: int, per_loader: int = 0,
                 ring_slots: int = 0):
        self.spec, self.make, self.first, self.count, self.start_step = spec, make, first, count, start_step
        self.per_loader, self.ring_slots = per_loader or count, ring_slots

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        first = self.first + (info.id * self.per_loader if info else 0)
        count = self.per_loader if info else self.count
        b = self.spec.lane_batch
        lanes = [lane_samples(self.spec, lane, self.start_step * b) for lane in range(first, first + count)]
        step, ring = self.start_step, SlotRing(self.ring_slots) if info and self.ring_slots else None
        while True:
            samples = [s for it in lanes for s in (next(it) for _ in range(b))]
            item = self.make(samples, step, offset=first * b, total=self.spec.batch_size)
            yield ring.put(item) if ring else item
            step += 1


class SlotRing:
    """A loader process's items in a fixed set of shared-memory tensors, handed to the trainer once and then
    refilled: each new shared tensor is a fresh mapping in the trainer whose pages fault on first read (in a
    VM ~10 ms a step at the demo's batch, half the receive cost), a reused one is already mapped. The trainer
    copies a slot out (`merge_items`) before the loader can come round to it again (`slots` > prefetch + 1)."""

    def __init__(self, slots: int):
        self.slots, self.held, self.count = slots, [], 0

    def put(self, item: dict) -> dict:
        k, self.count = self.count % self.slots, self.count + 1
        tensors = {n: v for n, v in item.items() if isinstance(v, torch.Tensor)}
        rest = {n: v for n, v in item.items() if n not in tensors}
        if k == len(self.held):
            self.held.append({n: v.share_memory_() for n, v in tensors.items()})
            return {**rest, "slot": k, "shared": self.held[k]}
        for n, v in tensors.items():
            self.held[k][n].copy_(v)
        return {**rest, "slot": k}


def take_slot(item: dict, held: dict) -> dict:
    """A received item with its slot's tensors (the trainer's side of SlotRing)."""
    slot = item.pop("slot")
    if "shared" in item:
        held[slot] = item.pop("shared")
    return {**item, **held[slot]}


def merge_items(items: list[dict]) -> dict:
    """One step's items in lane order; tensors are copied (torch.cat), so that the loaders' slots are free again."""
    out = {}
    for k, v in items[0].items():
        if k == "step":
            if any(it["step"] != v for it in items):
                raise RuntimeError(f"loader processes out of step: {[it['step'] for it in items]}")
            out[k] = v
        elif isinstance(v, torch.Tensor):
            out[k] = torch.cat([it[k] for it in items])
        else:
            out[k] = [e for it in items for e in it[k]]
    return out


def worker_batches(spec: StreamSpec, make: BatchMaker, rank: int, world: int, start_step: int,
                   loader_workers: int) -> Iterator[dict]:
    """This worker's batches from `start_step` on: its lanes' items merged, prefetched by loader processes."""
    per_rank = spec.streams // world
    loader_workers = max((d for d in range(1, loader_workers + 1) if per_rank % d == 0), default=0)
    prefetch = 4
    group = LaneGroup(spec, make, rank * per_rank, per_rank, start_step,
                      per_loader=per_rank // loader_workers if loader_workers else 0, ring_slots=prefetch + 2)
    if not loader_workers:
        yield from iter(group)
        return
    loader = torch.utils.data.DataLoader(group, batch_size=None, num_workers=loader_workers, prefetch_factor=prefetch,
                                         worker_init_fn=_one_thread)
    it, held = iter(loader), [{} for _ in range(loader_workers)]
    while True:
        yield merge_items([take_slot(next(it), held[w]) for w in range(loader_workers)])


def _one_thread(_):
    """A loader process decodes on one thread in the idle scheduling class: it works ahead into the prefetch
    queue whenever a core is free and never takes one from the trainer's compute threads (at a mere lower
    nice value its time slices still stall a step's threads at their next barrier). Should the step use every
    core all the time, the loader starves, the step waits on the queue, and then the cores are free for it."""
    torch.set_num_threads(1)
    # A SIGTERM to the whole process group (`timeout`, `kill -- -PGID`, a scheduler) reaches the loaders too.
    # torch's own handler exits quietly only when the trainer sent it; killed by the signal, a loader makes the
    # trainer raise "DataLoader worker ... killed" over its one-line stop message. The trainer reports the stop.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        try:
            os.nice(19)
        except OSError:
            pass
