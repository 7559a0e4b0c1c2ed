"""Shared pieces of the sampler tests."""

Z_MAX = 3.5  # per-example |z| bound of the Monte-Carlo tests (fixed seeds; p ~ 5e-4 each)


def forever(sampler):
    """Index batches epoch after epoch (each batch is selected before the next is drawn)."""
    while True:
        yield from sampler


class Prefetcher:
    """Hands out index batches as a DataLoader with ``depth`` batches in flight does: drawn
    ahead within an epoch, a new epoch's iterator only once the last epoch's are taken."""

    def __init__(self, sampler, depth):
        self.sampler, self.depth, self.it, self.ahead = sampler, depth, None, []

    def __next__(self):
        if self.it is None and not self.ahead:
            self.it = iter(self.sampler)
        while self.it is not None and len(self.ahead) <= self.depth:
            try:
                self.ahead.append(next(self.it))
            except StopIteration:
                self.it = None
        return self.ahead.pop(0) if self.ahead else next(self)
