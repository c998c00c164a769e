"""Helpers shared by every checkpoint loader: '/'-joined paths, tree checks, clear errors.

A loader builds a flat ``{'encoder/layers_0/attention/query/kernel': array}`` dict,
compares it with the shapes the model expects (``jax.eval_shape`` of ``model.init``)
and fails with one message listing *every* missing, unexpected and mis-shaped name,
so a wrong config or a truncated file is diagnosed in one run.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

SEP = '/'
_MAX_LISTED = 25  # names printed per category; the rest is counted


def flatten(tree: Mapping[str, Any], prefix: str = '',
            is_leaf: Optional[Callable[[Any], bool]] = None) -> dict[str, Any]:
  """Nested mappings -> ``{'a/b/c': leaf}``: the package's one flatten helper.

  Leaves are anything that is not a Mapping, and Mappings for which ``is_leaf`` is true
  (e.g. a TensorStore spec inside a T5X msgpack).
  """
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}{SEP}{key}' if prefix else str(key)
    if isinstance(value, Mapping) and not (is_leaf is not None and is_leaf(value)):
      flat.update(flatten(value, name, is_leaf))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``{'a/b/c': leaf}`` -> nested plain dicts (inverse of :func:`flatten`)."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(SEP)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'{name!r}: {part!r} is both a leaf and a subtree')
    if leaf in node:
      raise ValueError(f'{name!r} given twice (or is also a subtree)')
    node[leaf] = value
  return tree


def _shape(leaf: Any) -> tuple[int, ...]:
  # Flax's logical-partitioning boxes (nn.Partitioned / LogicallyPartitioned) hold the array.
  if hasattr(leaf, 'unbox'):
    leaf = leaf.unbox()
  return tuple(int(d) for d in leaf.shape)


def _listing(title: str, lines: Sequence[str]) -> str:
  shown = [f'  {line}' for line in lines[:_MAX_LISTED]]
  if len(lines) > _MAX_LISTED:
    shown.append(f'  ... and {len(lines) - _MAX_LISTED} more')
  return f'{title} ({len(lines)}):\n' + '\n'.join(shown)


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: names missing, unexpected, or with the wrong shape.

  Attributes hold the sorted names: ``missing``, ``unexpected`` and ``mismatched``
  (``(name, expected_shape, checkpoint_shape)`` triples).
  """

  def __init__(self, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               mismatched: Iterable[tuple[str, tuple, tuple]] = (), source: str = 'checkpoint',
               notes: Optional[Mapping[str, str]] = None):
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = sorted(mismatched)
    notes = notes or {}
    note = lambda n: f'{n}  ({notes[n]})' if n in notes else n
    parts = [f'{source} does not match the model:']
    if self.missing:
      parts.append(_listing('missing from the checkpoint', [note(n) for n in self.missing]))
    if self.unexpected:
      parts.append(_listing('unexpected (not in the model)', [note(n) for n in self.unexpected]))
    if self.mismatched:
      parts.append(_listing('wrong shape (model expects vs checkpoint has)', [
          f'{note(n)}: {tuple(want)} vs {tuple(got)}' for n, want, got in self.mismatched]))
    super().__init__('\n'.join(parts))


def tree_diff(expected: Mapping[str, Any], loaded: Mapping[str, Any]
              ) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
  """Compares two (flat or nested) trees by name and shape -> (missing, unexpected, mismatched)."""
  want = {n: _shape(v) for n, v in flatten(expected).items()}
  got = {n: _shape(v) for n, v in flatten(loaded).items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  mismatched = sorted((n, want[n], got[n]) for n in set(want) & set(got) if want[n] != got[n])
  return missing, unexpected, mismatched


def check_tree(expected: Mapping[str, Any], loaded: Mapping[str, Any], *,
               source: str = 'checkpoint', extra_unexpected: Iterable[str] = (),
               notes: Optional[Mapping[str, str]] = None) -> None:
  """Raises :class:`CheckpointMismatchError` unless ``loaded`` has ``expected``'s names and shapes.

  expected: shape tree (arrays, ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``, or flax boxes).
  loaded: flat ('/'-joined) or nested dict of arrays.
  extra_unexpected: source-side names the loader could not map at all (reported as unexpected).
  notes: optional ``{name: text}`` shown next to a name (e.g. the source tensor it comes from).
  """
  missing, unexpected, mismatched = tree_diff(expected, loaded)
  unexpected += list(extra_unexpected)
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(missing, unexpected, mismatched, source, notes)


def missing_checkpoint_error(path: Any, what: str, how_to_get: str) -> FileNotFoundError:
  """A FileNotFoundError naming the file(s) looked for and how to obtain them (raise it)."""
  return FileNotFoundError(f'{what} not found at {str(path)!r}.\n{how_to_get}')


class UnsafePathError(ValueError):
  """A checkpoint's own listing (index.json, TensorStore spec) names a file outside the checkpoint."""


def resolve_inside(root: Any, relative: Any, listed_in: str) -> str:
  """``root/relative`` as a normalised absolute path, or :class:`UnsafePathError` if it escapes.

  root: the checkpoint directory. relative: a path *read from a checkpoint file*.
  listed_in: which file listed it (for the message).
  Refused: absolute paths, and paths whose '..' parts leave ``root`` (or name ``root``
  itself). The check is on the normalised text, not after following symlinks: HF hub cache
  snapshots are directories of symlinks into ``../../blobs``, and a symlink is put there
  by whoever owns the directory, whereas ``relative`` is data that only names files.
  """
  rel = os.fspath(relative)
  base = os.path.normpath(os.path.abspath(os.fspath(root)))
  full = os.path.normpath(os.path.join(base, rel))
  if (not rel or '\x00' in rel or os.path.isabs(rel) or full == base
      or os.path.commonpath([base, full]) != base):
    raise UnsafePathError(
        f'{listed_in} names {rel!r}, which is outside the checkpoint directory {base!r}; '
        'a checkpoint may only refer to files inside itself (no absolute paths, no ".." '
        'leaving it): fix that entry or re-save the checkpoint')
  return full
