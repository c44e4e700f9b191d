"""GGUF files for tests: a real model's weights under edited metadata (gguf-py's own copier)."""

from pathlib import Path

import gguf
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata


def with_metadata(source: Path, dest: Path, fields: dict[str, str | float]) -> Path:
    """`source` copied to `dest` with `fields` set (strings and float32 values), nothing else changed."""
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch=arch, endianess=reader.endianess)
    typed = {
        key: MetadataDetails(gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32, value)
        for key, value in fields.items()
    }
    copy_with_new_metadata(reader, writer, typed, remove_metadata=())
    return dest
