"""Reading ``refs(<split_by>).p`` files as data: a pickle that may hold only plain values.

The refer toolkit ships its refs as pickles, and ``pickle.load`` runs whatever a crafted file
names (``__reduce__`` payloads). :func:`load_refs` unpickles with :class:`PlainUnpickler`, which
builds dicts, lists, tuples, strings, bytes, numbers, booleans and ``None`` (pickle opcodes, no
class lookup) and refuses every class lookup except ``set`` and ``frozenset``; it then checks
that each ref has the fields a reader needs. Damaged bytes are one :class:`DataError`, whatever
the unpickler raised on them; an opcode scan before it (:func:`check_memo`, about 2 s for a
40 MB file of refs) keeps a damaged index from allocating gigabytes.
"""

from __future__ import annotations

import io
import pickle
import pickletools
from pathlib import Path

from flmm.errors import DataError

# the only globals a file of plain values needs (old protocols pickle sets through a class lookup)
ALLOWED_GLOBALS = {(m, n) for m in ("builtins", "__builtin__") for n in ("set", "frozenset")}
# what the unpickler (or the opcode scan) raises on damaged bytes, besides UnpicklingError / EOF
BROKEN = (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, MemoryError)
MEMO_STORES = {"PUT", "BINPUT", "LONG_BINPUT"}
SENTENCE_TEXTS = ("sent", "raw")
REF_FIELDS = {"ref_id": int, "ann_id": int, "image_id": int, "split": str, "sentences": list}


class PlainUnpickler(pickle.Unpickler):
    """An unpickler that builds plain values only; any other class lookup raises ``DataError``."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"{self.path} asks to build {module}.{name}: refs files may hold only lists, dicts, "
            "strings and numbers, so it was not loaded (nothing in it ran); "
            "use the refs file of the refer toolkit, or rewrite it with plain values"
        )


def load_plain_pickle(path: str | Path):
    """Unpickle ``path`` with :class:`PlainUnpickler`; a file that is not a pickle, or whose bytes
    were damaged, is a DataError (:func:`check_memo`: a damaged one builds nothing huge)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        check_memo(data)
        return PlainUnpickler(io.BytesIO(data), path).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, *BROKEN) as err:
        raise DataError(
            f"{path} is not a readable refs pickle ({type(err).__name__}: {err}); "
            "the file may be truncated, damaged or of another format: download it again"
        ) from None


def check_memo(data: bytes) -> None:
    """``ValueError`` unless every opcode of the pickle ``data`` is whole and stores at a memo
    index below its length. The C unpickler grows its memo to twice the largest index it is
    given and clears it, so a damaged 4-byte index would take up to 64 GB; in a real pickle
    each store is an opcode of its own, so indices stay below the file's length."""
    for opcode, arg, pos in pickletools.genops(data):
        if opcode.name in MEMO_STORES and arg >= len(data):
            raise ValueError(
                f"{opcode.name} at byte {pos} stores at memo index {arg:,}, beyond a file of "
                f"{len(data):,} bytes"
            )


def load_refs(path: str | Path) -> list[dict]:
    """The refs of a ``refs(<split_by>).p`` file: a list of dicts, each with ``REF_FIELDS``."""
    refs = load_plain_pickle(path)
    if not isinstance(refs, list):
        raise DataError(f"{path} holds a {type(refs).__name__}, not the list of refs expected")
    for index, ref in enumerate(refs):
        check_ref(ref, index, path)
    return refs


def check_ref(ref, index: int, path: str | Path) -> None:
    """DataError naming the file and the ref when ``ref`` lacks a field or has one of a wrong type."""
    if not isinstance(ref, dict):
        raise DataError(f"{path}: ref #{index} is a {type(ref).__name__}, not a dict")
    where = f"{path}: ref #{index} (ref_id {ref.get('ref_id')!r})"
    for field, kind in REF_FIELDS.items():
        if field not in ref:
            raise DataError(f"{where} has no {field!r}; every ref needs {sorted(REF_FIELDS)}")
        if not isinstance(ref[field], kind) or isinstance(ref[field], bool):
            raise DataError(
                f"{where}: {field!r} is {type(ref[field]).__name__}, expected {kind.__name__}"
            )
    for sentence in ref["sentences"]:
        if not isinstance(sentence, dict):
            raise DataError(
                f"{where}: 'sentences' must be a list of dicts (raw, sent, tokens, ...)"
            )
        wrong = [k for k in SENTENCE_TEXTS if not isinstance(sentence.get(k, ""), str)]
        if wrong:
            raise DataError(f"{where}: a sentence's {wrong[0]!r} is not a string")
