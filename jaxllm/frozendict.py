"""A read-only, hashable dict for frozen configs."""


class FrozenDict(dict):
    """A read-only dict that hashes, so a config holding a mapping (stage weights) stays hashable."""

    def __hash__(self):
        return hash(frozenset(self.items()))

    def _read_only(self, *args, **kwargs):
        raise TypeError("config mappings are read-only")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _read_only

    def __reduce__(self):  # pickle and copy.deepcopy rebuild it from a plain dict
        return (FrozenDict, (dict(self),))
