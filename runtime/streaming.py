"""StreamingSwitchGLU: mlx-lm's SwitchGLU computed over an expert bank instead of all experts.

The module keeps the model's own ``SwitchGLU`` (so its activation and its ``__call__`` - the
gather/sort logic - are mlx-lm's, not a copy) and points that SwitchGLU's three projections at the
layer's bank arrays (``ExpertStore.arrays``, by component name). Per call, data flows one way,
streaming -> store -> (bank, reader): sync the router ids, ask the store for those experts
resident (``ExpertStore.request``), then run mlx-lm's SwitchGLU over the bank with the slot ids
the store hands back. Tokens are processed expert-major: the union of the experts routed by all
tokens (and all batch rows) is read once; when the union does not fit in the bank, the tokens
are split into groups whose unions fit.

Per MoE layer and decode token: 1 sync (the router ids; none once every expert is resident, as in
a bank of every expert, filled at load),
``misses x split`` preadv calls in the native pool (one batch, GIL released), 0 copies (reads
land in the bank), 0 expert arrays built. A step whose experts are all resident skips the
request machinery (``ExpertStore.resident_slots``: one table lookup). With misses and hits, the
hits are computed while the misses are read (``hits_first``; where a routed expert's row depends
on what else is in its gather_qmm call, as on CUDA at real sizes, ``ExpertStore.rows_exact`` is
False and such a step waits and is computed whole); the expert output is handed to MLX
for evaluation at once (``ExpertStore.eager``), so the GPU computes it while Python builds the
rest of the step. On CUDA the layer's attention output is handed over as soon as it is built
(``commit_early``), and a decode step's experts are launched *before* the router sync over the
bank's device table (expert -> slot, ``ExpertStore.slots_before_sync``): the sync waits for the
router alone while the GPU has the experts queued behind it, and then only confirms that every
expert was resident (else the step is computed again once the misses are read: with hits first
and exact rows, one token recomputes only the missed experts' rows). With
read-ahead (``--prefetch``) the same sync also evaluates the next layer's router on this layer's
input, and one more batch (the guessed misses of the next layer) is submitted without waiting;
guesses already read when their layer launches its experts are landed first (counted as
resident). Guesses still landing then are waited for before the launch (the router runs on the
GPU meanwhile) while recent precision is at least one half, since the step most likely routes
to one of them; below that, a step that routed to guesses still landing is recomputed (those
rows, or whole) once they landed. A request submits its misses' reads before it waits for the
guesses it routed to.
With a routing trace, every call syncs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU

from .experts_binding import bind_bank
from .store import ExpertStore, Pending


class _Compute:
    """Holds the SwitchGLU outside the module tree, so it never counts as model parameters."""

    def __init__(self, glu: SwitchGLU):
        self.glu = glu


class NextLayer:
    """The next MoE layer's router, for guessing its experts (outside the module tree)."""

    def __init__(self, layer: int, gate: nn.Module, top_k: int):
        self.layer = layer
        self.gate = gate
        self.top_k = top_k


def link_next_layers(parents: list[tuple[nn.Module, int]]) -> None:
    """Give each streaming module the router of the MoE layer after it (for read-ahead).

    ``parents``: (MoE block, layer) pairs; a block without a ``gate`` and ``top_k`` (a family
    that routes otherwise) gets no link, so its predecessor never reads ahead.
    """
    ordered = sorted(parents, key=lambda p: p[1])
    for (block, _), (after, layer) in zip(ordered, ordered[1:], strict=False):
        gate, top_k = getattr(after, "gate", None), getattr(after, "top_k", None)
        found = [streaming_of(m) for m in block.children().values()]
        stream = next((m for m in found if m is not None), None)
        # only a plain linear router gives logits to guess from (DeepSeek-style gates return
        # (ids, weights) and need their own state)
        linear = isinstance(gate, (nn.Linear, nn.QuantizedLinear))
        if stream is not None and linear and isinstance(top_k, int):
            stream.next_layer = NextLayer(layer, gate, top_k)


def commit_early(model: nn.Module, blocks: list[nn.Module], store: ExpertStore) -> int:
    """Make the other modules of each decoder layer holding one of ``blocks`` (MoE blocks) hand
    their output to MLX as soon as it is built, in decode steps with a partial bank: the
    attention (a module with submodules) always, the norms (modules without) while
    ``store.early_norms``.

    With a partial bank every MoE layer syncs on its router. Without this, the whole stretch
    since the previous sync (the rest of the last MoE block, the norms, the attention, the
    router: ~70-80 kernels per layer) is encoded only at the sync, and the GPU runs it while
    the host waits. Committed piece by piece (``mx.async_eval`` of each module's output), the GPU
    runs each piece while Python builds and encodes the next, and the sync waits only for the
    router's piece. Values never change (evaluation order only). The modules keep their class
    (a subclass per class, so parameter paths and ``isinstance`` stay as they were). Returns
    the number of modules changed.
    """
    wanted = {id(b) for b in blocks}
    made: dict[type, type] = {}  # one subclass per class
    changed = 0
    for _, module in model.named_modules():
        children = module.children()
        if not any(id(c) in wanted for c in children.values()):
            continue
        for child in children.values():
            if isinstance(child, nn.Module) and id(child) not in wanted:
                cls = type(child)
                if getattr(cls, "_flashmoe_commits", None) is not store:
                    if cls not in made:
                        norm = not any(isinstance(m, nn.Module) for m in child.children().values())
                        made[cls] = _committing_class(cls, store, norm)
                    child.__class__ = made[cls]
                changed += 1
    return changed


def _committing_class(cls: type, store: ExpertStore, norm: bool) -> type:
    """A subclass of ``cls`` whose calls hand a decode step's output to MLX at once (a
    ``norm``, a module without submodules, only while ``store.early_norms``)."""

    def __call__(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        # decode steps only (one position per sequence): a prompt is compute-bound
        if store.eager_layers and isinstance(out, mx.array) and out.ndim >= 2:
            if out.shape[-2] == 1 and store.syncs and (store.early_norms or not norm):
                mx.async_eval(out)
        return out

    return type(cls.__name__, (cls,), {"__call__": __call__, "_flashmoe_commits": store})


def streaming_of(module) -> StreamingSwitchGLU | None:
    """The streaming module itself, or the one a ``Timed`` wrapper holds; else None."""
    if isinstance(module, Timed):
        module = module.inner
    return module if isinstance(module, StreamingSwitchGLU) else None


class StreamingSwitchGLU(nn.Module):
    """Drop-in replacement for one MoE layer's ``SwitchGLU``; it owns no parameters."""

    def __init__(self, layer: int, original: SwitchGLU, store: ExpertStore):
        super().__init__()
        self.layer = layer
        self._store = store
        bind_bank(original, store.index.components, store.arrays(layer))
        self._original = _Compute(original)
        self.next_layer: NextLayer | None = None

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        store = self._store
        glu = self._original.glu
        slots = store.lookup(self.layer, indices)
        if slots is not None:  # every expert resident for good: no router sync
            return glu(x, slots)
        nxt = self.next_layer
        guess = ahead = None
        stats = store.stats
        t0 = time.perf_counter()
        if nxt is not None and store.prefetch_wanted(nxt.top_k):
            # the next layer's router on this layer's input: evaluated in the same sync
            guess = mx.argpartition(nxt.gate(x), kth=-nxt.top_k, axis=-1)[..., -nxt.top_k :]
        decode = indices.ndim >= 2 and indices.shape[-2] == 1  # one position per sequence
        one_token = indices.size == indices.shape[-1]
        launch = None
        if decode and store.presync and (one_token or store.presync_batched):
            # the router first (the sync waits for it): it runs while guesses still landing
            # for this layer are waited for
            mx.async_eval(indices, *([] if guess is None else [guess]))
            io = stats.io_seconds
            launch = store.slots_before_sync(self.layer, indices)
            t0 += stats.io_seconds - io  # that wait is exposed I/O, not sync
        if launch is not None:
            # launch the experts before the sync: the GPU runs them right after the router
            # while Python waits, instead of idling while Python builds them after the sync
            ids, landing = launch
            ahead = glu(x, ids)
            mx.async_eval(ahead)
        elif guess is not None:
            mx.eval(indices, guess)
        experts = np.array(indices)  # the router sync
        t1 = time.perf_counter()
        if decode:
            out = None
            if ahead is not None:
                if store.confirm_resident(self.layer, experts):
                    out = ahead
            elif (slots := store.resident_slots(self.layer, experts)) is not None:
                out = glu(x, slots)
                if store.eager:
                    mx.async_eval(out)
            if out is not None:  # every expert a hit
                store.banks[self.layer].add_pending(out)
                self._read_ahead(guess)
                stats.sync_seconds += t1 - t0
                stats.host_seconds += time.perf_counter() - t1
                return out
        io = stats.io_seconds
        flat = experts.reshape(-1, experts.shape[-1])
        store.record(self.layer, flat)
        unique = np.unique(flat)
        if unique.size <= store.slots:
            out = self._compute(x, experts, unique, ahead, landing if ahead is not None else None)
        else:
            out = self._compute_in_groups(x, experts, flat)
        if store.eager and decode:
            # a decode step (one position per sequence): the GPU computes the experts while
            # Python builds the rest of the step (the values are the same whenever they are
            # evaluated; a prompt's experts are compute-bound, nothing to gain there)
            mx.async_eval(out)
        self._read_ahead(guess)
        stats.sync_seconds += t1 - t0
        stats.host_seconds += time.perf_counter() - t1 - (stats.io_seconds - io)
        return out

    def _read_ahead(self, guess: mx.array | None) -> None:
        """Submit the reads of the next layer's guessed experts (evaluated in the sync)."""
        if guess is not None:
            self._store.prefetch(self.next_layer.layer, np.unique(np.array(guess)).tolist())

    def _compute(
        self,
        x: mx.array,
        experts: np.ndarray,
        unique: np.ndarray,
        ahead: mx.array | None = None,
        landing: set[int] | None = None,
    ) -> mx.array:
        """``ahead``: this step's expert output launched before the sync, whose rows are final
        for the experts resident then, except those in ``landing`` (read ahead, still being
        read at launch: ``slots_before_sync``); with hits first and exact rows
        (``ExpertStore.rows_exact``), one token keeps those rows (several tokens' partial
        outputs would not be bit-identical on CUDA)."""
        store = self._store
        pending = store.request(self.layer, unique.tolist())
        glu = self._original.glu
        one_token = experts.size == experts.shape[-1]
        redo = {e for e, _ in pending.misses}
        if ahead is not None and landing:
            redo |= landing & set(unique.tolist())  # landed by now (request waited for them)
        if ahead is not None and not redo:  # every routed expert was resident at launch
            out = ahead
        elif (
            redo and len(redo) < unique.size and store.hits_first and store.rows_exact and one_token
        ):
            out = self._hits_first(x, experts, pending, redo, ahead)
        else:
            pending.wait()
            out = glu(x, pending.slot_ids(experts))
        pending.computed(out)
        return out

    def _hits_first(
        self,
        x: mx.array,
        experts: np.ndarray,
        pending: Pending,
        redo: set[int],
        ahead: mx.array | None = None,
    ) -> mx.array:
        """One token: compute its resident experts while the misses are read, then the misses
        (``redo``: the misses, and with ``ahead`` the experts whose rows there are not final).

        Each routed expert's row of the SwitchGLU output depends on that expert alone, so the
        two partial outputs, put back in routing order, are the rows mlx-lm computes; the
        block's weighted sum then runs over them as usual (bit-identical). With ``ahead`` (all
        rows, launched before the sync) its rows of experts not in ``redo`` are taken as they are.
        """
        glu = self._original.glu
        row = experts.reshape(-1)
        flags = [e in redo for e in row.tolist()]  # a set: np.isin costs ~40 us per call here
        hit_pos = np.array([i for i, m in enumerate(flags) if not m], dtype=np.int64)
        miss_pos = np.array([i for i, m in enumerate(flags) if m], dtype=np.int64)
        lead = experts.shape[:-1]
        if ahead is None:
            ahead = glu(x, pending.slot_ids(row[hit_pos].reshape(*lead, -1)))
            mx.async_eval(ahead)
            order = np.argsort(np.concatenate([hit_pos, miss_pos]))
        else:  # row i of ``ahead`` is routed expert i; a miss's row is replaced
            order = np.arange(row.size)
            order[miss_pos] = row.size + np.arange(miss_pos.size)
        pending.wait()
        out_misses = glu(x, pending.slot_ids(row[miss_pos].reshape(*lead, -1)))
        both = mx.concatenate([ahead, out_misses], axis=-2)
        return mx.take(both, mx.array(order.astype(np.uint32)), axis=-2)

    def _compute_in_groups(self, x: mx.array, experts: np.ndarray, flat: np.ndarray) -> mx.array:
        """Split the tokens into groups whose expert unions fit in the bank.

        Tokens are independent in an MoE block, so they are first ordered by their (sorted) expert
        ids - tokens routed alike become neighbours - and then packed greedily: fewer groups, hence
        fewer syncs and fewer experts read twice. Every row's result is the same in any grouping.
        """
        slots = self._store.slots
        if flat.shape[1] > slots:
            raise ValueError(f"{flat.shape[1]} experts per token do not fit in {slots} slots")
        order = np.lexsort(np.sort(flat, axis=1).T[::-1])
        groups, rows, seen = [], [], set()
        for row in order.tolist():
            ids = set(flat[row].tolist())
            if len(seen | ids) > slots:
                groups.append((rows, seen))
                rows, seen = [], set()
            rows.append(row)
            seen |= ids
        groups.append((rows, seen))
        lead = x.shape[:-1]
        xs = x.reshape(-1, x.shape[-1])
        outs = []
        for rows, ids in groups:
            take = mx.array(np.array(rows, dtype=np.uint32))
            # a later group may overwrite slots this one reads: the store evaluates it first
            outs.append(self._compute(xs[take], flat[rows], np.array(sorted(ids))))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        out = mx.concatenate(outs, axis=0)[mx.array(inverse.astype(np.uint32))]
        return out.reshape(*lead, *out.shape[1:])


@dataclass
class Timing:
    """Seconds per phase, accumulated by ``Timed`` wrappers (``load(timing=True)``)."""

    dense: float = 0.0
    router: float = 0.0
    compute: float = 0.0

    def reset(self) -> None:
        self.dense = self.router = self.compute = 0.0


class Timed(nn.Module):
    """Wraps a streaming module to time its phases; adds two syncs per call.

    dense: evaluating the layer input (everything before this MoE block's experts); router: the
    call itself minus the exposed expert I/O (router sync, bookkeeping, graph building);
    compute: evaluating the output.
    """

    def __init__(self, inner: StreamingSwitchGLU, timing: Timing):
        super().__init__()
        self.inner = inner
        self._timing = timing

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        t, stats = self._timing, self.inner._store.stats
        t0 = time.perf_counter()
        mx.eval(x)
        t1 = time.perf_counter()
        io = stats.io_seconds
        out = self.inner(x, indices)
        t2 = time.perf_counter()
        mx.eval(out)
        t.dense += t1 - t0
        t.router += (t2 - t1) - (stats.io_seconds - io)
        t.compute += time.perf_counter() - t2
        return out
