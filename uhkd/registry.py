"""Name -> builder registries. Every user-facing name (methods, datasets, model families) is looked up here,
so an unknown name always fails with the list of valid ones."""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import choice_error

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._prefixes: dict[str, Callable[[str], T]] = {}  # open-ended names: "prefix/<anything>" -> built item

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = item
            return item

        return add

    def register_prefix(self, prefix: str, build: Callable[[str], T]) -> None:
        """Names starting with `prefix` (e.g. "torch/") are built on lookup by `build(name)`."""
        self._prefixes[prefix] = build

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        prefix = next((p for p in self._prefixes if name.startswith(p) and len(name) > len(p)), None)
        if prefix is None:
            raise choice_error(self.kind, name, self.names())
        return self._prefixes[prefix](name)

    def names(self) -> list[str]:
        """Registered names in registration order, then `prefix<name>` for each open-ended prefix."""
        return list(self._items) + [f"{p}<name>" for p in self._prefixes]

    def __contains__(self, name: object) -> bool:
        return name in self._items or (isinstance(name, str) and any(name.startswith(p) for p in self._prefixes))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


METHODS: Registry = Registry("method")
DATASETS: Registry = Registry("dataset")
