"""Settlement gas learned from earlier estimates, so most preflights simulate with one cheap eth_call."""

from __future__ import annotations


class GasBook:
    """The settlement gas a network's ``transferWithAuthorization`` needs, learned from the node's estimates.

    Settling an EOA-signed authorization of one token costs nearly the same gas every time (the storage slots it
    writes differ only in warm/cold and zero/non-zero), so after one ``eth_estimateGas`` a plain ``eth_call`` is
    enough to simulate the next ones (see ``preflight_exact``); the relayer's limit keeps its margin over the
    highest estimate seen. Every ``refresh_every``-th preflight estimates again, and a settlement of ours that
    reverts clears what was learned, so a token upgrade that costs more is picked up at once.
    """

    __slots__ = ("_calls", "_known", "refresh_every")

    def __init__(self, refresh_every: int = 64) -> None:
        self.refresh_every = refresh_every
        self._known: int | None = None
        self._calls = 0

    def hint(self) -> int | None:
        """The gas to assume for the next simulation, or None: estimate it."""
        self._calls += 1
        if self._known is None or self._calls % self.refresh_every == 0:
            return None
        return self._known

    def learn(self, estimate: int) -> None:
        if estimate > 0:
            self._known = max(self._known or 0, estimate)

    def forget(self) -> None:
        self._known = None
