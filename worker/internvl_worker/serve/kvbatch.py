"""The decode batch's KV cache: one left-padded tensor per layer that rows join and leave between steps.

Layout per layer: keys/values (rows, kv_heads, capacity, head_dim); all rows share one timeline of
`length` columns, a row's tokens are right-aligned (its padding is on the left) and `mask` (rows,
capacity) marks its real columns. A decode step writes column `length` of every row in place, so a step
costs no copy (transformers' DynamicCache concatenates, copying the whole cache every step).

Joining: a request is prefilled alone (batch 1, no padding: the same numbers as `generate` for it), then
its cache is copied into a free row, right-aligned. When its prompt is longer than the current timeline,
every row is shifted right once (one copy). Leaving: rows are dropped with one index-select, and the
leading columns no row uses any more are cut off. RoPE stays exact because positions are passed per row
(a row's position = its count of real tokens), not derived from the column.
"""

from __future__ import annotations


def _round_up(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class BatchLayer(DynamicLayer):
        """A cache layer over preallocated (rows, heads, capacity, dim) buffers; `update` writes in place."""

        def __init__(self, keys, values, length: int):
            super().__init__()
            self.kbuf, self.vbuf, self.length = keys, values, length
            self.device = keys.device
            self.is_initialized = True

        @property
        def keys(self):
            return self.kbuf[:, :, : self.length]

        @keys.setter
        def keys(self, value):  # DynamicLayer.__init__ assigns None; the buffers hold the real state
            pass

        @property
        def values(self):
            return self.vbuf[:, :, : self.length]

        @values.setter
        def values(self, value):
            pass

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self.kbuf.shape[-2]:
                self.kbuf, self.vbuf = (_grow(t, _round_up(end * 2)) for t in (self.kbuf, self.vbuf))
            self.kbuf[:, :, self.length : end] = key_states
            self.vbuf[:, :, self.length : end] = value_states
            self.length = end
            return self.kbuf[:, :, :end], self.vbuf[:, :, :end]

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
            # transformers 5.24 passes the query length; earlier 5.x the cache_position tensor
            q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
            return self.length + q, 0

    return BatchLayer


def _grow(t, capacity: int):
    import torch

    out = torch.empty(*t.shape[:2], capacity, t.shape[3], dtype=t.dtype, device=t.device)
    out[:, :, : t.shape[2]] = t
    return out


class KVBatch:
    """Rows of running requests and their shared, left-padded KV cache."""

    def __init__(self, device):
        self.device = device
        self.rows: list = []  # the engine's per-request objects, in row order
        self.layers: list = []  # BatchLayer per model layer
        self.mask = None  # (rows, capacity) long: 1 where the row has a real token
        self.length = 0
        self._cls = None

    def __len__(self) -> int:
        return len(self.rows)

    def cache(self):
        from transformers.cache_utils import Cache

        return Cache(layers=self.layers)

    def attention_mask(self, new_tokens: int = 1):
        """(rows, length + new_tokens): the stored mask plus ones for the columns being written."""
        end = self.length + new_tokens
        if end > self.mask.shape[1]:
            import torch

            grown = torch.zeros(self.mask.shape[0], _round_up(end * 2), dtype=self.mask.dtype, device=self.device)
            grown[:, : self.mask.shape[1]] = self.mask
            self.mask = grown
        self.mask[:, self.length : end] = 1
        return self.mask[:, :end]

    def advance(self, new_tokens: int = 1) -> None:
        self.length += new_tokens
        assert all(layer.length == self.length for layer in self.layers), "layers out of step with the batch"

    def add(self, rows: list, caches: list) -> None:
        """Append rows; caches[i] is a list over layers of (keys, values), each (1, heads, P_i, dim)."""
        import torch

        if not rows:
            return
        if self._cls is None:
            self._cls = _layer_class()
        lengths = [kv[0][0].shape[-2] for kv in caches]
        old_rows, old_len = len(self.rows), self.length
        new_len = max([old_len, *lengths])
        shift = new_len - old_len  # existing rows move right by this much
        total = old_rows + len(rows)
        capacity = _round_up(new_len + 64)
        mask = torch.zeros(total, capacity, dtype=torch.long, device=self.device)
        if old_rows:
            mask[:old_rows, shift:new_len] = self.mask[:, :old_len]
        for i, n in enumerate(lengths):
            mask[old_rows + i, new_len - n : new_len] = 1
        layers = []
        for li in range(len(caches[0])):
            k0 = caches[0][li][0]
            shape = (total, k0.shape[1], capacity, k0.shape[3])
            keys = torch.zeros(shape, dtype=k0.dtype, device=self.device)
            values = torch.zeros(shape, dtype=k0.dtype, device=self.device)
            if old_rows:
                keys[:old_rows, :, shift:new_len] = self.layers[li].kbuf[:, :, :old_len]
                values[:old_rows, :, shift:new_len] = self.layers[li].vbuf[:, :, :old_len]
            for i, n in enumerate(lengths):
                k, v = caches[i][li]
                keys[old_rows + i, :, new_len - n : new_len] = k[0]
                values[old_rows + i, :, new_len - n : new_len] = v[0]
            layers.append(self._cls(keys, values, new_len))
        self.rows = self.rows + list(rows)
        self.layers, self.mask, self.length = layers, mask, new_len

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order); cut the leading columns that no kept row uses."""
        import torch

        if len(indices) == len(self.rows):
            return
        if not indices:
            self.rows, self.layers, self.mask, self.length = [], [], None, 0
            return
        idx = torch.tensor(indices, device=self.device)
        mask = self.mask.index_select(0, idx)
        used = mask[:, : self.length].any(0).nonzero()
        first = int(used[0]) if len(used) else self.length
        # Cutting costs nothing here (the index-select copies anyway); it keeps attention from reading
        # columns that are padding in every row.
        for layer in self.layers:
            layer.kbuf = layer.kbuf.index_select(0, idx)[:, :, first:]
            layer.vbuf = layer.vbuf.index_select(0, idx)[:, :, first:]
            layer.length -= first
        self.mask = mask[:, first:]
        self.length -= first
        self.rows = [self.rows[i] for i in indices]
