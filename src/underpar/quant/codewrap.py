"""Code bytes as a submission ships them: the counted source as one self-extracting script,
compressed (raw LZMA2 at preset 9 extreme, or brotli-11) and base85-encoded, as the records'
train_gpt.py wrappers are (e.g. 157,868 raw bytes -> 31,999). Executing the wrapper runs
exactly the bundled source; `unwrap` recovers it without running it.
"""

from __future__ import annotations

import base64
import builtins
import lzma
from collections.abc import Sequence
from pathlib import Path

from underpar.errors import ArtifactError
from underpar.quant.compress import available

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
METHODS = ("lzma", "brotli")


def bundle(files: Sequence[Path], root: Path) -> str:
    """The files' text in order, each after a `# ==== path ====` line (paths relative to root)."""
    return "".join(f"# ==== {Path(f).relative_to(root)} ====\n{Path(f).read_text(encoding='utf-8')}" for f in files)


def wrap(source: str, method: str = "lzma") -> bytes:
    """A Python script that executes `source`, holding it compressed with `method`."""
    data = source.encode("utf-8")
    if method == "lzma":
        payload = base64.b85encode(lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS))
        return (b'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("' + payload
                + b'"),format=L.FORMAT_RAW,filters=[{"id":L.FILTER_LZMA2}]))\n')
    if method == "brotli":
        import brotli

        payload = base64.b85encode(brotli.compress(data, quality=11, lgwin=24))
        return b'import brotli as R,base64 as B\nexec(R.decompress(B.b85decode("' + payload + b'")))\n'
    raise ArtifactError(f"unknown code wrapper {method!r}; valid: {', '.join(METHODS)}")


def smallest_wrapper(source: str) -> tuple[str, bytes]:
    """(method, wrapper) of the smallest wrapper among the methods available here."""
    options = [(m, wrap(source, m)) for m in METHODS if m == "lzma" or available(m)]
    return min(options, key=lambda mw: len(mw[1]))


def unwrap(script: bytes) -> str:
    """The source a wrapper would execute, got by running the wrapper with `exec` captured."""
    captured: list[bytes | str] = []
    env = {"__builtins__": {**vars(builtins), "exec": lambda code, *a: captured.append(code)}}
    exec(compile(script, "<wrapper>", "exec"), env)  # noqa: S102 - a wrapper this module wrote
    if len(captured) != 1:
        raise ArtifactError("not a code wrapper: it did not exec exactly one payload")
    code = captured[0]
    return code.decode("utf-8") if isinstance(code, bytes) else code
