"""Text prompts as conditioning data: a collection's prompt table (``PromptTable``) and reading prompt files.

A text-conditioned teacher (``Backbone.takes_prompts``) is collected from a list of prompts. Each *distinct*
prompt is encoded once (``Backbone.encode_prompts``) and its embedding stored once, in float16, in the collection's
``prompts.safetensors``; each trajectory stores only the row of its prompt in that table (the ``prompt`` column) and
its guidance scale W (``guidance``). Example k takes line k mod L of the L-line prompt list. The negative prompt's
embedding is the guided ε's null branch. Every stage uses the stored float16 embeddings (cast to float32): the
teacher while collecting, the student while training, so a trajectory is a function of its seed, its prompt and W.

File format (``PROMPTS_FORMAT``): safetensors with the tensors ``embedding.<name>`` (P, *shape) and ``null.<name>``
(*shape) for each conditioning input, ``order`` (L,) int64 (the table row of each line of the prompt list), and
the prompts (JSON list) and negative prompt in the metadata. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .backbones import Backbone

__all__ = ["PROMPTS_FILE", "PROMPTS_FORMAT", "PromptTable", "read_prompt_file", "distinct_prompts"]

PROMPTS_FILE = "prompts.safetensors"
PROMPTS_FORMAT = "opdiff-prompts/1"
STORED_DTYPE = torch.float16
TABLE_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")  # read with `datasets`; anything else: one prompt a line
TEXT_COLUMNS = ("text", "prompt", "caption")  # the column taken from a table when none is named


def read_prompt_file(path: str | os.PathLike, column: str | None = None) -> tuple[str, ...]:
    """The prompts of a file: one per non-blank line (a text file), or a text column of a .csv/.json/.jsonl/.parquet
    table read with ``datasets`` (``column``, default the first of text, prompt, caption). Raises ValueError for a
    file without prompts, FileNotFoundError for a missing one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist")
    if p.suffix.lower() in TABLE_SUFFIXES:
        prompts = _table_column(p, column)
    else:
        if column is not None:
            raise ValueError(f"a prompt column applies to {', '.join(TABLE_SUFFIXES)} tables, not to {p.name!r}")
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    prompts = [s for s in prompts if s]
    if not prompts:
        raise ValueError(f"prompt file {str(p)!r} holds no prompts: write one prompt per line")
    return tuple(prompts)


def _table_column(path: Path, column: str | None) -> list[str]:
    import datasets

    kind = {".jsonl": "json"}.get(path.suffix.lower(), path.suffix.lower().lstrip("."))
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
        if column is None:
            raise ValueError(
                f"{str(path)!r} has no column {', '.join(TEXT_COLUMNS)}: name the prompt column (columns: "
                f"{', '.join(ds.column_names)})"
            )
    elif column not in ds.column_names:
        raise ValueError(f"{str(path)!r} has no column {column!r} (columns: {', '.join(ds.column_names)})")
    return [str(v) if v is not None else "" for v in ds[column]]


def distinct_prompts(prompts: Sequence[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(the distinct prompts in order of first appearance, the row of each given prompt among them)."""
    rows: dict[str, int] = {}
    order = tuple(rows.setdefault(p, len(rows)) for p in prompts)
    return tuple(rows), order


def _sha256(tensors: dict[str, Tensor], text: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(list(text)).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PromptTable:
    """A collection's prompts: the distinct ``prompts``, the table row of each line of the prompt list
    (``order``), the ``negative_prompt``, and the float16 ``embeddings`` (name → (P, *shape)) and ``null``
    (name → the negative prompt's (*shape)) of the backbone's conditioning inputs."""

    prompts: tuple[str, ...]
    order: tuple[int, ...]
    negative_prompt: str
    embeddings: dict[str, Tensor]
    null: dict[str, Tensor]

    @classmethod
    def build(cls, backbone: "Backbone", prompts: Sequence[str], negative_prompt: str = "") -> "PromptTable":
        """Encode each distinct prompt once, and the negative prompt, with the backbone's text encoder."""
        if not prompts:
            raise ValueError("no prompts given: pass at least one prompt (--prompts FILE)")
        table, order = distinct_prompts(list(prompts))
        encoded = backbone.encode_prompts([*table, negative_prompt])
        stored = {k: v.to(STORED_DTYPE).cpu() for k, v in encoded.items()}
        return cls(
            table,
            order,
            negative_prompt,
            {k: v[:-1].contiguous() for k, v in stored.items()},
            {k: v[-1].contiguous() for k, v in stored.items()},
        )

    def rows(self, examples: Sequence[int]) -> Tensor:
        """(B,) long: the table row of each example index k (line k mod L of the prompt list)."""
        return torch.tensor([self.order[int(k) % len(self.order)] for k in examples], dtype=torch.long)

    def inputs(self, rows: Tensor) -> dict[str, Tensor]:
        """The conditioning inputs (name → (B, *shape) float32) of table rows ``rows``."""
        rows = torch.as_tensor(rows, dtype=torch.long).cpu()
        return {k: v[rows].float() for k, v in self.embeddings.items()}

    def null_inputs(self) -> dict[str, Tensor]:
        """The negative prompt's conditioning inputs (name → (*shape) float32): guidance's null branch."""
        return {k: v.float() for k, v in self.null.items()}

    def sha256(self) -> str:
        """A digest of the stored embeddings, the prompts, their order and the negative prompt."""
        tensors = {**{f"embedding.{k}": v for k, v in self.embeddings.items()}}
        tensors.update({f"null.{k}": v for k, v in self.null.items()})
        return _sha256(tensors, [*self.prompts, "\0order", *map(str, self.order), "\0negative", self.negative_prompt])

    def identity(self) -> dict:
        """What a collection's identity records of its prompts (equal identities: equal conditioning)."""
        return {
            "num_lines": len(self.order),
            "num_distinct": len(self.prompts),
            "negative_prompt": self.negative_prompt,
            "inputs": {k: list(v.shape[1:]) for k, v in self.embeddings.items()},
            "dtype": str(STORED_DTYPE).removeprefix("torch."),
            "file": PROMPTS_FILE,
            "sha256": self.sha256(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the table to a safetensors file (atomically: a temporary name, then a rename)."""
        from safetensors.torch import save_file

        tensors = {f"embedding.{k}": v for k, v in self.embeddings.items()}
        tensors.update({f"null.{k}": v for k, v in self.null.items()})
        tensors["order"] = torch.tensor(self.order, dtype=torch.int64)
        meta = {
            "format": PROMPTS_FORMAT,
            "prompts": json.dumps(list(self.prompts)),
            "negative_prompt": self.negative_prompt,
        }
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "PromptTable":
        """Read a table written by ``save``; with ``sha256`` (the collection identity's), refuse one that differs."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(path)!r} does not exist: the collection's prompt table is missing (re-run `opdiff collect`)"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != PROMPTS_FORMAT:
            raise ValueError(f"{str(path)!r} is no opdiff prompt table of format {PROMPTS_FORMAT}")
        tensors = load_file(str(path))
        table = cls(
            tuple(json.loads(meta["prompts"])),
            tuple(int(i) for i in tensors.pop("order").tolist()),
            meta["negative_prompt"],
            {k.removeprefix("embedding."): v for k, v in tensors.items() if k.startswith("embedding.")},
            {k.removeprefix("null."): v for k, v in tensors.items() if k.startswith("null.")},
        )
        if sha256 is not None and table.sha256() != sha256:
            raise ValueError(f"{str(path)!r} does not match its collection (its sha256 differs): re-collect")
        return table
