"""LightningDataModule: files -> normalised conversations -> tokens + masks -> deterministic split -> loaders."""

from __future__ import annotations

import json
import logging
import math
import signal
from collections import Counter

import datasets
import lightning.pytorch as pl
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from lightning_moe.config.schema import DataConfig
from lightning_moe.data.chat import ChatRenderer
from lightning_moe.data.collate import ChatCollator
from lightning_moe.data.formats import DataError, read_many, read_stats
from lightning_moe.data.sampler import TokenBudgetBatchSampler

COLUMNS = ["input_ids", "labels", "domain_id"]
log = logging.getLogger(__name__)


class ChatDataModule(pl.LightningDataModule):
    """Loads and tokenises once per process (`setup`), then serves stateful loaders.

    StatefulDataLoader records its position inside an epoch, and Lightning stores that in checkpoints, so a
    resumed run continues with the next batch rather than restarting the epoch (under DDP too: `_rank_share`).
    """

    def __init__(self, cfg: DataConfig, tokenizer, domains: list[str], routing_level: str = "sequence",
                 pooling: str = "mean"):
        super().__init__()
        self.cfg, self.tokenizer, self.domains = cfg, tokenizer, domains
        capacity = cfg.batch_tokens or cfg.batch_size * cfg.max_length  # what a micro-batch can hold (fill rate)
        self.collator = ChatCollator(tokenizer.pad_token_id, packing=cfg.packing, row_length=cfg.row_length or cfg.max_length,
                                     routing_level=routing_level, pooling=pooling, capacity=capacity)
        self.train_set = self.val_set = None
        self.stats: dict = {}

    def _tokenise(self, ds: datasets.Dataset, split: str) -> datasets.Dataset:
        render = ChatRenderer(self.tokenizer, self.cfg.max_length, self.cfg.overlong)
        if self.cfg.system_prompt:
            ds = ds.map(lambda ex: {"messages": _with_system(ex["messages"], self.cfg.system_prompt)})
        ds = ds.map(
            lambda ex: render(ex["messages"]),
            num_proc=self.cfg.map_num_proc,
            desc=f"tokenising {split}",
        )
        kept = ds.filter(lambda ex: not ex["dropped"])
        overlong, dropped = sum(ds["overlong"]), Counter(r for r in ds["dropped"] if r)
        if overlong or dropped:  # counted in summary.json too; said once here so nobody is surprised later
            log.warning("%s: %d of %d conversations longer than data.max_length=%d (%s)%s", split, overlong, len(ds),
                        self.cfg.max_length, "truncated" if self.cfg.overlong == "truncate" else "dropped",
                        f"; left out: {dict(dropped)}" if dropped else "")
        self.stats[split] = {
            "conversations": len(ds),
            "kept": len(kept),
            "overlong": sum(ds["overlong"]),
            "overlong_action": self.cfg.overlong,
            "dropped": dict(Counter(r for r in ds["dropped"] if r)),
            "tokens": sum(len(x) for x in kept["input_ids"]),
            "target_tokens": sum(kept["n_target"]),
            "by_domain": _domain_counts(kept["domain_id"], self.domains),
        }
        return kept.select_columns(COLUMNS)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._read_split()
        self.stats["duplicates"] = _duplicates(train, val)
        self.train_set = self._tokenise(train, "train")
        self.val_set = self._tokenise(val, "val")
        if len(self.train_set) == 0:
            raise DataError(f"no trainable conversations left in {self.cfg.train_files}: {self.stats['train']}")
        if len(self.val_set) == 0:
            log.warning("the validation set is empty (%s): validation never runs, so there is no best checkpoint and "
                        "early stopping does nothing", self.stats["val"])

    def _read_split(self) -> tuple[datasets.Dataset, datasets.Dataset]:
        """The training and validation conversations, untokenised: the same split on every machine and rank."""
        # accounting: rows read = kept + skipped (per reason); kept = conversations of train + val, each of
        # which is either kept or dropped (per reason) by _tokenise
        train, reports = read_many(self.cfg.train_files, self.domains, self.cfg.on_error)
        val = None
        if self.cfg.val_files:
            val, val_reports = read_many(self.cfg.val_files, self.domains, self.cfg.on_error)
            reports += val_reports
        self.stats["read"] = read_stats(reports)
        if val is None:  # deterministic: the same seed and files give the same split on every machine and rank
            held_out = math.ceil(len(train) * self.cfg.val_fraction)  # datasets' own rule
            if held_out >= len(train):
                raise DataError(
                    f"data.val_fraction: {len(train)} conversation(s) in {list(self.cfg.train_files)} cannot be split "
                    f"{1 - self.cfg.val_fraction:.0%}/{self.cfg.val_fraction:.0%} into training and validation; give "
                    "validation files (data.val_files=[...]), another data.val_fraction, or more conversations")
            parts = train.train_test_split(test_size=self.cfg.val_fraction, seed=self.cfg.split_seed, shuffle=True)
            train, val = parts["train"], parts["test"]
        return train, val

    def _loader(self, ds, shuffle: bool, sampler=None) -> StatefulDataLoader:
        return StatefulDataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory,
            persistent_workers=self.cfg.num_workers > 0,
            worker_init_fn=ignore_sigterm,
        )

    def evaluation_dataloader(self, files: list[str] | None = None, batch_size: int | None = None) -> StatefulDataLoader:
        """The run's own validation split (files=None: the same split as training, so no training row is evaluated),
        or the conversations of `files`, read and tokenised as validation files are."""
        if files:
            ds, reports = read_many(list(files), self.domains, self.cfg.on_error)
            self.stats["read"] = read_stats(reports)
            self.val_set = self._tokenise(ds, "val")
        elif self.val_set is None:  # the run's validation split; the training split is never tokenised for it
            self.val_set = self._tokenise(self._read_split()[1], "val")
        loader = self._loader(self.val_set, shuffle=False)
        if batch_size:
            loader = StatefulDataLoader(self.val_set, batch_size=batch_size, shuffle=False, collate_fn=self.collator)
        return loader

    def train_dataloader(self) -> StatefulDataLoader:
        if not self.cfg.batch_tokens:
            return self._loader(self.train_set, shuffle=True, sampler=self._rank_share())
        sampler = TokenBudgetBatchSampler(None, [len(x) for x in self.train_set["input_ids"]], self.cfg.batch_tokens,
                                          self.collator.row_length if self.cfg.packing else None,
                                          seed=self.cfg.split_seed)
        self.stats["batches"] = {"batch_tokens": self.cfg.batch_tokens, "micro_batches": len(sampler),
                                 "fill_rate": round(sampler.fill_rate(), 4),
                                 "padded_batches": sampler.epoch_batches(0)[1]}
        log.info("micro-batches of at most %d tokens: %d an epoch, %.1f%% full", self.cfg.batch_tokens, len(sampler),
                 100 * sampler.fill_rate())
        return StatefulDataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collator,
                                  num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory,
                                  persistent_workers=self.cfg.num_workers > 0, worker_init_fn=ignore_sigterm)

    def _rank_share(self) -> StatefulDistributedSampler | None:
        """Under DDP, this rank's share of each epoch's shuffled conversations, from a sampler whose order is a
        function of (seed, epoch) and whose position the loader's checkpointed state carries (rank 0's, which is
        every rank's: the shares are padded to one length): a resumed run goes on with the next micro-batch on every
        rank. None with one process, where the loader's own RandomSampler is exact (its saved state holds its
        generator's).

        Left to Lightning, that RandomSampler (torchdata's, not torch's, so Lightning does not see a shuffle to
        replace) is wrapped in a DistributedSamplerWrapper, which draws a new permutation from the RandomSampler's
        generator at every iteration; no checkpoint carries that generator, so a resumed run read other
        conversations from its first micro-batch on. The epoch is not in the saved state: Lightning sets it from the
        restored epoch count, and this sampler computes its order at the first draw, which comes after that. (A
        plain DistributedSampler computes it when the loader's iterator is made, which Lightning does on resume
        before setting the epoch: a run resumed in epoch 1 would read epoch 0's order.)"""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return None
        return StatefulDistributedSampler(self.train_set, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                          shuffle=True, seed=self.cfg.split_seed)

    def val_dataloader(self) -> StatefulDataLoader:
        return self._loader(self.val_set, shuffle=False)


def _with_system(messages: list[dict], prompt: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": prompt}, *messages]


def _duplicates(train: datasets.Dataset, val: datasets.Dataset) -> dict:
    """Identical conversations (by their messages) within each split and in both: counted, and warned about when
    validation would score conversations training has seen."""
    def keys(ds):
        return [json.dumps(m, sort_keys=True) for m in ds["messages"]]

    tr, va = keys(train), keys(val)
    out = {"train": len(tr) - len(set(tr)), "val": len(va) - len(set(va)), "train_and_val": len(set(tr) & set(va))}
    if out["train_and_val"]:
        log.warning("%d conversations are in both the training and the validation split: validation scores data the "
                    "model trained on (deduplicate the files, or give data.val_files)", out["train_and_val"])
    elif out["train"] or out["val"]:
        log.info("identical conversations: %d in training, %d in validation", out["train"], out["val"])
    return out


def _domain_counts(ids: list[int], domains: list[str]) -> dict:
    c = Counter(ids)
    out = {name: c.get(i, 0) for i, name in enumerate(domains)}
    if c.get(-1):
        out["unlabelled"] = c[-1]
    return out


def ignore_sigterm(worker_id: int) -> None:
    """In each dataloader worker. PyTorch's workers exit quietly on a SIGTERM from their parent, but one from anyone
    else kills them, and a scheduler's often reaches every process of the job (SLURM's scancel, `timeout`): the main
    process then raises mid-step, exits 1 and never saves the step it stopped at. Ignored here, the main process
    stops the run itself (checkpoint, summary, exit 143) and then its workers; one still exits if its parent dies
    (PyTorch's watchdog)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
