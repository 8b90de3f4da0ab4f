"""JSONL -> megatron-core indexed datasets (`PREFIX_{key}_document.{bin,idx}`), one document per line.

Lines are read as bytes and decoded here, so a bad line is counted under a skip reason instead of
stopping the run (a UTF-8 byte-order mark starting a line is accepted), and the summary names the
first lines of each reason. Workers tokenize chunks of lines; results are written in input order in
megatron-core's indexed format (indexed_format.py), in the smallest dtype the vocabulary fits. A run
that would write an empty dataset is refused.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter, deque
from itertools import islice
from typing import BinaryIO, Callable, Iterator, Optional, Sequence, Union

import numpy

from megatron_mm.data.indexed_format import IndexedWriter, optimal_dtype
from megatron_mm.data.tokenizer import Tokenizer, build_tokenizer
from megatron_mm.errors import UserError

# Why a line or a document was not written. Line-level reasons skip the line for every key;
# the others are counted once per (line, key).
SKIP_REASONS = {
    "blank_line": "line is empty or whitespace",
    "invalid_utf8": "bytes are not valid UTF-8 (or the text has lone surrogates)",
    "malformed_json": "line is not valid JSON",
    "not_an_object": "JSON value is not an object",
    "missing_key": "object lacks the json key",
    "not_a_string": "value of the json key is not a string",
    "empty_document": "text is empty or whitespace, or tokenizes to nothing",
}

LINES_PER_CHUNK = 256
# Locations (line numbers) of each skip reason kept for the summary.
REPORTED_LOCATIONS = 5
CHUNKS_IN_FLIGHT_PER_WORKER = 4

LineResult = Union[str, list]  # a line-level skip reason, or per key: token array or skip reason


def output_prefix_for_key(output_prefix: str, json_key: str) -> str:
    return f"{output_prefix}_{json_key}_document"


class DocumentEncoder:
    """Turns raw JSONL lines into token arrays (one per json key) or skip reasons."""

    def __init__(self, tokenizer: Tokenizer, json_keys: Sequence[str], append_eod: bool):
        self.tokenizer = tokenizer
        self.json_keys = list(json_keys)
        self.append_eod = append_eod
        self.dtype = optimal_dtype(tokenizer.vocab_size)

    def encode_line(self, line: bytes) -> LineResult:
        if not line.strip():
            return "blank_line"
        try:
            record = json.loads(line.decode("utf-8-sig"))
        except UnicodeDecodeError:
            return "invalid_utf8"
        except ValueError:
            return "malformed_json"
        if not isinstance(record, dict):
            return "not_an_object"
        return [self._encode_text(record, key) for key in self.json_keys]

    def _encode_text(self, record: dict, key: str) -> Union[str, numpy.ndarray]:
        if key not in record:
            return "missing_key"
        text = record[key]
        if not isinstance(text, str):
            return "not_a_string"
        if not text.strip():
            return "empty_document"
        try:
            text.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates tokenizers reject
        except UnicodeEncodeError:
            return "invalid_utf8"
        ids = self.tokenizer.tokenize(text)
        if not ids:
            return "empty_document"
        if self.append_eod:
            ids = [*ids, self.tokenizer.eod]
        return numpy.asarray(ids, dtype=self.dtype)

    def encode_chunk(self, lines: list[bytes]) -> list[LineResult]:
        return [self.encode_line(line) for line in lines]


def _read_chunks(source: BinaryIO, lines_per_chunk: int) -> Iterator[list[bytes]]:
    while chunk := list(islice(source, lines_per_chunk)):
        yield chunk


# Each pool worker builds its own encoder once (tokenizers are not shared across processes).
_worker_encoder = None


def _init_worker(make_encoder: Callable, encoder_args: tuple) -> None:
    global _worker_encoder
    _worker_encoder = make_encoder(*encoder_args)


def _encode_chunk_in_worker(chunk: list) -> list:
    return _worker_encoder.encode_chunk(chunk)


def encode_in_order(tagged_chunks: Iterator[tuple[object, list]], encoder, workers: int, make_encoder: Callable,
                    encoder_args: tuple) -> Iterator[tuple[object, list]]:
    """(tag, encoder.encode_chunk(chunk)) for each (tag, chunk), in input order. With workers > 1
    the chunks are encoded in a process pool, each worker with its own make_encoder(*encoder_args).

    Pool.imap would read the whole input ahead into its task queue; a bounded window of
    apply_async calls keeps the same order with memory bounded by a few chunks per worker.
    """
    if workers == 1:
        for tag, chunk in tagged_chunks:
            yield tag, encoder.encode_chunk(chunk)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(make_encoder, encoder_args)) as pool:
        pending = deque()
        for tag, chunk in tagged_chunks:
            pending.append((tag, pool.apply_async(_encode_chunk_in_worker, (chunk,))))
            if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * workers:
                tag, result = pending.popleft()
                yield tag, result.get()
        for tag, result in pending:
            yield tag, result.get()


def _document_encoder(tokenizer_type: str, tokenizer_model: str, json_keys: list[str],
                      append_eod: bool) -> DocumentEncoder:
    return DocumentEncoder(build_tokenizer(tokenizer_type, tokenizer_model), json_keys, append_eod)


def preprocess_jsonl(
    input_path: str,
    json_keys: Sequence[str],
    tokenizer_type: str,
    tokenizer_model: str,
    output_prefix: str,
    workers: int = 1,
    append_eod: bool = False,
    lines_per_chunk: int = LINES_PER_CHUNK,
    progress: bool = True,
) -> dict:
    """Tokenize every line of `input_path` into `output_prefix_{key}_document.{bin,idx}` per json key.

    `workers` > 1 tokenizes in a multiprocessing pool (order kept); 1 tokenizes in this process.
    Returns the summary: docs, docs_per_key, tokens, lines, bytes, seconds, skipped (reason ->
    count), skipped_at (reason -> its first line numbers), outputs (key -> prefix). Raises UserError
    for a missing or unreadable input or tokenizer model, and when a key would get no document
    (nothing is written then).
    """
    if not os.path.isfile(input_path):
        raise UserError(f"input file not found: {input_path}")
    if not json_keys:
        raise UserError("at least one json key is needed")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    encoder = DocumentEncoder(tokenizer, json_keys, append_eod)
    outputs = {key: output_prefix_for_key(output_prefix, key) for key in json_keys}
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    # Written under temporary names and renamed at the end: readers never see a half-written dataset.
    builders = {key: IndexedWriter(f"{prefix}.bin.partial", encoder.dtype) for key, prefix in outputs.items()}
    start = time.perf_counter()
    try:
        counts = _write_documents(input_path, encoder, builders, workers, lines_per_chunk, tokenizer_type,
                                  tokenizer_model, progress)
        for key, written in counts["docs_per_key"].items():
            if not written:
                raise UserError(f"{input_path}: no document written" + (f" for json key {key!r}" if
                                len(json_keys) > 1 else "") + f" ({_why_nothing(counts)})")
        for key, prefix in outputs.items():
            builders[key].finalize(f"{prefix}.idx.partial")
            os.replace(f"{prefix}.bin.partial", f"{prefix}.bin")
            os.replace(f"{prefix}.idx.partial", f"{prefix}.idx")
    finally:
        for builder in builders.values():
            builder.close()
        for prefix in outputs.values():
            for partial in (f"{prefix}.bin.partial", f"{prefix}.idx.partial"):
                if os.path.exists(partial):
                    os.remove(partial)
    return {**counts, "seconds": time.perf_counter() - start, "outputs": outputs}


def _write_documents(
    input_path: str,
    encoder: DocumentEncoder,
    builders: dict,
    workers: int,
    lines_per_chunk: int,
    tokenizer_type: str,
    tokenizer_model: str,
    progress: bool,
) -> dict:
    from tqdm import tqdm

    skipped, skipped_at, docs_per_key = Counter(), {}, Counter({key: 0 for key in encoder.json_keys})
    tokens, lines, bytes_read = 0, 0, 0

    def note_skip(reason: str, line_number: int) -> None:
        skipped[reason] += 1
        first_lines = skipped_at.setdefault(reason, [])
        if len(first_lines) < REPORTED_LOCATIONS and line_number not in first_lines:
            first_lines.append(line_number)

    with open(input_path, "rb") as source, tqdm(
        total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="preprocess", disable=not progress
    ) as bar:
        chunks = ((sum(map(len, chunk)), chunk) for chunk in _read_chunks(source, lines_per_chunk))
        encoder_args = (tokenizer_type, tokenizer_model, encoder.json_keys, encoder.append_eod)
        for chunk_bytes, chunk_results in encode_in_order(chunks, encoder, workers, _document_encoder, encoder_args):
            for line_result in chunk_results:
                lines += 1
                if isinstance(line_result, str):
                    note_skip(line_result, lines)
                    continue
                for key, document in zip(encoder.json_keys, line_result):
                    if isinstance(document, str):
                        note_skip(document, lines)
                        continue
                    builders[key].add_document(document)
                    docs_per_key[key] += 1
                    tokens += document.size
            bytes_read += chunk_bytes
            bar.update(chunk_bytes)
    return {
        "docs": sum(docs_per_key.values()),
        "docs_per_key": dict(docs_per_key),
        "tokens": tokens,
        "lines": lines,
        "bytes": bytes_read,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
        "skipped_at": {reason: skipped_at[reason] for reason in SKIP_REASONS if skipped[reason]},
    }


def _why_nothing(counts: dict) -> str:
    if not counts["lines"]:
        return "the file holds no line"
    return f"{counts['lines']} lines read, skipped: " + ", ".join(
        skip_counts(counts["skipped"], counts["skipped_at"]))


def skip_counts(skipped: dict[str, int], skipped_at: dict[str, list]) -> list[str]:
    """`reason: count (lines 4, 9, 12, ...)` per reason; locations are line numbers or names."""
    return [f"{reason}: {count} ({_locations(skipped_at[reason], count)})" for reason, count in skipped.items()]


def _locations(first: list, count: int) -> str:
    more = ", ..." if count > len(first) else ""
    if all(isinstance(location, int) for location in first):
        return ("line " if len(first) == 1 and not more else "lines ") + ", ".join(map(str, first)) + more
    return "at " + ", ".join(map(str, first)) + more


def format_skipped(skipped: dict[str, int], skipped_at: dict[str, list], reasons: dict[str, str]) -> list[str]:
    """The skip lines of a preprocessing summary: the total, then each reason with its count, its
    first locations and what it means."""
    lines = [f"skipped: {sum(skipped.values())}" + ("" if skipped else " (none)")]
    return lines + [f"  {counted}: {reasons[reason]}" for reason, counted in
                    zip(skipped, skip_counts(skipped, skipped_at))]


def format_summary(summary: dict) -> str:
    seconds = max(summary["seconds"], 1e-9)
    lines = [
        f"docs written: {summary['docs']}  tokens: {summary['tokens']}  lines read: {summary['lines']}  "
        f"bytes read: {summary['bytes']}  ({summary['seconds']:.2f} s, {summary['docs'] / seconds:.0f} docs/s, "
        f"{summary['bytes'] / seconds / 1e6:.2f} MB/s)"
    ]
    lines += format_skipped(summary["skipped"], summary["skipped_at"], SKIP_REASONS)
    lines += [f"output: {prefix}.bin / {prefix}.idx" for prefix in summary["outputs"].values()]
    return "\n".join(lines)
