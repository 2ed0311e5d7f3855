"""Reading a processed split's token columns in Arrow batches with numpy (never a Python loop per
token), and naming the records a row came from."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset

BATCH_ROWS = 2_000


def flat_column(table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """All values of a list column, concatenated, and each row's length."""
    lists = table.column(column).combine_chunks()
    return (lists.flatten().to_numpy(zero_copy_only=False),
            pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64))


def batches(dataset: Dataset):
    """(first row number, Arrow table) per batch of rows."""
    for number, table in enumerate(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)):
        yield number * BATCH_ROWS, table


@dataclass
class TokenBatch:
    """A batch of rows flattened: every token's id, label and row, and each row's first token."""

    ids: np.ndarray
    labels: np.ndarray
    row_of: np.ndarray
    row_first: np.ndarray
    rows: int

    @classmethod
    def read(cls, table) -> "TokenBatch":
        ids, lengths = flat_column(table, "input_ids")
        labels, _ = flat_column(table, "labels")
        row_first = np.zeros(len(ids), dtype=bool)
        row_first[(np.cumsum(lengths) - lengths)[lengths > 0]] = True
        return cls(ids, labels, np.repeat(np.arange(len(lengths)), lengths), row_first, len(lengths))


class Provenance:
    """Where a batch's rows came from: `source` ("path:line") per row, or `sources` (a list) per
    packed row or block. Rows without either are named by split and row number."""

    def __init__(self, table, split: str, first_row: int, unit: str = "row"):
        present = [column for column in ("sources", "source") if column in table.column_names]
        self.column = table.column(present[0]).combine_chunks() if present else None
        self.split, self.first_row, self.unit = split, first_row, unit

    def counts(self) -> np.ndarray | None:
        """How many records each row holds, if known."""
        if self.column is None:
            return None
        if pa.types.is_list(self.column.type) or pa.types.is_large_list(self.column.type):
            return pc.list_value_length(self.column).to_numpy(zero_copy_only=False)
        return np.ones(len(self.column), dtype=np.int64)

    def records(self, row: int) -> list[str]:
        value = self.column[row].as_py() if self.column is not None else None
        return value if isinstance(value, list) else [value] if value else []

    def row(self, row: int) -> str:
        where, names = f"{self.split} {self.unit} {self.first_row + row}", self.records(row)
        return f"{', '.join(names[:3])} ({where})" if names else where

    def sample(self, row: int, within: int) -> str:
        names = self.records(row)
        return names[within] if within < len(names) else self.row(row)
