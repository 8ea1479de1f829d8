"""Walking a result nest: tuples, lists and dicts of leaves.

One module for what every side does to a nest (the workers lay results out,
the parent batches samples, the adapter builds and checks a signature and
stacks small elements): a
path names a leaf (``(0, "image")``, said ``result[0]['image']`` in errors),
and lists are read as tuples, the only sequence type ``tf.data`` accepts.
"""
from __future__ import annotations

from typing import Any, Callable


def at(nest: Any, path: tuple) -> Any:
    """The part of ``nest`` at ``path``; a leaf (or None) stands for all below it."""
    for key in path:
        if isinstance(nest, dict):
            nest = nest.get(key)
        elif isinstance(nest, (tuple, list)):
            nest = nest[key] if key < len(nest) else None
        else:
            return nest
    return nest


def path_text(path: tuple) -> str:
    """'result[0]["image"]' for the path (0, "image")."""
    return "result" + "".join(f"[{key!r}]" for key in path)


def map_nest(fn: Callable[[Any, tuple], Any], value: Any, path: tuple = ()) -> Any:
    """Apply fn(leaf, path) to every leaf; tuples and lists come back as tuples."""
    if isinstance(value, (tuple, list)):
        return tuple(map_nest(fn, v, path + (i,)) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: map_nest(fn, v, path + (k,)) for k, v in value.items()}
    return fn(value, path)


def leaves(value: Any) -> list[tuple[tuple, Any]]:
    """(path, leaf) of every leaf, in the nest's order."""
    found: list[tuple[tuple, Any]] = []
    map_nest(lambda leaf, path: found.append((path, leaf)), value)
    return found


def stack_nests(nests: list[Any], column: Callable[[list[Any], tuple], Any],
                path: tuple = ()) -> Any:
    """One nest in the first one's structure whose leaf at each path is
    ``column(the leaves of every nest there, path)``: how batches of nests
    are stacked leaf by leaf (the caller checked that the structures agree)."""
    first = nests[0]
    if isinstance(first, dict):
        return {key: stack_nests([nest[key] for nest in nests], column, path + (key,))
                for key in first}
    if isinstance(first, (tuple, list)):
        return tuple(stack_nests([nest[i] for nest in nests], column, path + (i,))
                     for i in range(len(first)))
    return column(nests, path)
