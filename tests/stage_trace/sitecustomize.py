"""Records what each eaglepipe process of a test checkout really uses: params keys and modules.

Copied to `src/sitecustomize.py` of a test checkout, it is loaded by every Python process started there with
`PYTHONPATH=src`, as every stage command and the servers they start are. It records:
- each field read on the config dataclasses of `eaglepipe.config.schema`, as a dotted key ("data.seq_length").
  Reaching a section is not a read; reading a whole one (e.g. to hash it) reads each of its fields. Reads by
  the schema's own `check()` methods are validation at load time and are left out; reads on list items count
  as reads of the list (`data.sources[0].kind` is `data.sources`).
- the file of every eaglepipe module loaded by the time the process exits.
At exit, a process run as `python -m eaglepipe...` writes {module, pid, ppid, reads, modules} to
`stage_trace/<pid>.json` beside `src/`.
"""
from __future__ import annotations

import atexit
import dataclasses
import inspect
import json
import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent
OUT = SRC.parent / "stage_trace"


def _install() -> set[str]:
    """Hook attribute reads on every schema dataclass; returns the set the reads go into."""
    from eaglepipe.config import schema

    reads: set[str] = set()
    # id -> (dotted key, the section itself, kept alive so that its id is never reused)
    keys: dict[int, tuple[str, object]] = {}

    def key_of(obj: object) -> str | None:
        if id(obj) in keys:
            return keys[id(obj)][0]
        return "" if type(obj) is schema.Config else None

    for cls in vars(schema).values():
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == schema.__name__):
            continue
        fields = frozenset(f.name for f in dataclasses.fields(cls))

        def getattribute(self, name, fields=fields):
            value = object.__getattribute__(self, name)
            base = key_of(self) if name in fields else None
            if base is not None:
                key = f"{base}.{name}" if base else name
                caller = inspect.currentframe().f_back.f_code
                if dataclasses.is_dataclass(value):
                    keys.setdefault(id(value), (key, value))
                elif not (caller.co_name == "check" and caller.co_filename == schema.__file__):
                    reads.add(key)
            return value

        cls.__getattribute__ = getattribute
    return reads


def _write(reads: set[str]) -> None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name.startswith("eaglepipe."):
        return
    modules = sorted(Path(m.__file__).relative_to(SRC.parent).as_posix() for name, m in list(sys.modules.items())
                     if (name == "eaglepipe" or name.startswith("eaglepipe.")) and getattr(m, "__file__", None))
    OUT.mkdir(exist_ok=True)
    record = {"module": spec.name, "pid": os.getpid(), "ppid": os.getppid(), "reads": sorted(reads),
              "modules": modules}
    (OUT / f"{os.getpid()}.json").write_text(json.dumps(record))


atexit.register(_write, _install())
