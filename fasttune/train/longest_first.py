"""The longest micro-batch first: a GPU run that will run out of memory does so at step 1.

A run's peak memory comes with its longest batch, which a shuffled order may reach hours in
(unslothai/unsloth#1624). :class:`LongestFirst` takes the order the trainer's own sampler gives
(seeded, and the same again on a resume) and moves the ``batch`` longest rows to its front, in
every epoch (so that a run resumed in any epoch sees the order an unstopped run saw); the rest
keep their order. Every row is still seen once per epoch.
"""
from __future__ import annotations


class LongestFirst:
    def __init__(self, inner, lengths: list[int], batch: int):
        self.inner, self.lengths, self.batch = inner, lengths, batch

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self):
        order = list(iter(self.inner))
        longest = sorted(order, key=lambda index: -self.lengths[index])[: self.batch]
        chosen = set(longest)
        yield from longest
        yield from (index for index in order if index not in chosen)


def longest_batch_first(trainer) -> None:
    """Make ``trainer`` (one process) draw its longest rows first."""
    original = trainer._get_train_sampler
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]

    def sampler(train_dataset=None):
        inner = original(train_dataset)
        return None if inner is None else LongestFirst(inner, lengths, trainer.args.train_batch_size)

    trainer._get_train_sampler = sampler
