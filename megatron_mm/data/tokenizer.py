"""Text tokenizers (sentencepiece, Hugging Face) behind one small interface, and sentencepiece training.

Every tokenizer has `.tokenize(text) -> list[int]` (no BOS/EOS added), `.detokenize(ids) -> str`,
`.vocab_size`, `.eod` (the end-of-document/EOS id) and `.pad` (the pad id, or `.eod` when the
vocabulary has none). Models are only ever read from local paths. A file that is not a model of the
type asked for (truncated, or a model of the other type) is a UserError naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Protocol

from megatron_mm.errors import UserError

# Spellings of the end-of-text and pad tokens in common vocabularies, tried when the tokenizer's
# own configuration names none.
KNOWN_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
KNOWN_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
# Files AutoTokenizer reads a tokenizer from; a directory with none of them holds no tokenizer.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class Tokenizer(Protocol):
    vocab_size: int
    eod: int
    pad: int

    def tokenize(self, text: str) -> list[int]: ...

    def detokenize(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece `.model` file; its EOS piece is the end-of-document token."""

    def __init__(self, model_path: str):
        import sentencepiece

        self.model_path = model_path
        if os.path.isdir(model_path):
            raise UserError(f"{model_path} is a directory, not a sentencepiece .model file (a Hugging Face "
                            f"tokenizer directory takes tokenizer type huggingface)")
        if _starts_like_json(model_path):
            raise UserError(f"{model_path} is JSON (a Hugging Face tokenizer.json), not a sentencepiece .model "
                            f"file: use tokenizer type huggingface")
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (RuntimeError, OSError) as err:
            raise UserError(f"{model_path} is not a readable sentencepiece model (truncated or another format): "
                            f"{_one_line(err)}") from None
        self.vocab_size = self._processor.get_piece_size()
        self.eod = self._processor.eos_id()
        if self.eod < 0:
            raise UserError(f"sentencepiece model {model_path} defines no EOS piece (eos_id=-1)")
        pad = self._processor.pad_id()
        self.pad = pad if pad >= 0 else self.eod

    def tokenize(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
    """A local `tokenizer.json` file (tokenizers library) or a local Hugging Face tokenizer directory.

    A directory is loaded with transformers' AutoTokenizer, offline. The EOS and pad tokens are the ones
    its configuration names (for a bare tokenizer.json: a tokenizer_config.json beside it), else the
    first well-known spelling the vocabulary has.
    """

    def __init__(self, model_path: str):
        self.model_path = model_path
        if os.path.isdir(model_path):
            self._load_directory(model_path)
        else:
            self._load_tokenizer_json(model_path)
        if self.eod is None:
            raise UserError(f"cannot find an EOS token in Hugging Face tokenizer {model_path}")
        if self.pad is None:
            self.pad = self.eod

    def _load_directory(self, path: str) -> None:
        from transformers import AutoTokenizer

        if not any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES):
            raise UserError(f"{path} holds no Hugging Face tokenizer file ({', '.join(HF_TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as err:  # what transformers raises for unusable files
            raise UserError(f"{path} is not a readable Hugging Face tokenizer directory: {_one_line(err)}") from None
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self._decode = tokenizer.decode
        self.vocab_size = len(tokenizer)
        token_to_id = tokenizer.get_vocab().get
        self.eod = _first_token_id(token_to_id, [tokenizer.eos_token, *KNOWN_EOS_TOKENS])
        self.pad = _first_token_id(token_to_id, [tokenizer.pad_token, *KNOWN_PAD_TOKENS])

    def _load_tokenizer_json(self, path: str) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        if not _starts_like_json(path) and _is_sentencepiece_model(path):
            raise UserError(f"{path} is a sentencepiece model, not a Hugging Face tokenizer: "
                            f"use tokenizer type sentencepiece")
        try:
            tokenizer = RustTokenizer.from_file(path)
        except Exception as err:  # the tokenizers library raises a bare Exception for unparsable files
            raise UserError(f"{path} is not a readable Hugging Face tokenizer.json (truncated or another format): "
                            f"{_one_line(err)}") from None
        self._encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids
        self._decode = tokenizer.decode
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        named = _special_tokens_from_config(Path(path).with_name("tokenizer_config.json"))
        self.eod = _first_token_id(tokenizer.token_to_id, [named.get("eos_token"), *KNOWN_EOS_TOKENS])
        self.pad = _first_token_id(tokenizer.token_to_id, [named.get("pad_token"), *KNOWN_PAD_TOKENS])

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._decode([int(i) for i in ids])


def _starts_like_json(path: str) -> bool:
    """A JSON object's first byte (a tokenizer.json), after any UTF-8 BOM and whitespace."""
    with open(path, "rb") as file:
        head = file.read(64)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")


def _is_sentencepiece_model(path: str) -> bool:
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError):
        return False
    return True


def _one_line(err: BaseException) -> str:
    """A library's error message on one line."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _special_tokens_from_config(config_path: Path) -> dict[str, str]:
    """eos_token/pad_token strings of a tokenizer_config.json (either a string or an AddedToken dict)."""
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{config_path} is not valid JSON: {_one_line(err)}") from None
    tokens = {}
    for name in ("eos_token", "pad_token"):
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _first_token_id(token_to_id: Callable[[str], Optional[int]], candidates: list[Optional[str]]) -> Optional[int]:
    """Id of the first candidate token the vocabulary has."""
    for token in candidates:
        if token is not None and (token_id := token_to_id(token)) is not None:
            return token_id
    return None


TOKENIZER_TYPES = {
    "sentencepiece": SentencePieceTokenizer,
    "huggingface": HuggingFaceTokenizer,
}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str) -> Tokenizer:
    """The tokenizer of `tokenizer_type` read from the local path `tokenizer_model`."""
    if tokenizer_type not in TOKENIZER_TYPES:
        raise UserError(
            f"unknown tokenizer type {tokenizer_type!r}; valid types: {', '.join(TOKENIZER_TYPES)}"
        )
    if not tokenizer_model or not os.path.exists(tokenizer_model):
        raise UserError(f"tokenizer model not found: {tokenizer_model}")
    return TOKENIZER_TYPES[tokenizer_type](tokenizer_model)


def _jsonl_texts(input_jsonl: str, json_key: str) -> Iterator[str]:
    """Non-empty string values of `json_key`; unreadable lines are skipped, as preprocessing does."""
    with open(input_jsonl, "rb") as lines:
        for line in lines:
            try:
                record = json.loads(line.decode("utf-8-sig"))  # a line may start with a BOM (Windows files)
            except (UnicodeDecodeError, ValueError):
                continue
            text = record.get(json_key) if isinstance(record, dict) else None
            if isinstance(text, str) and text.strip():
                yield text


def train_sentencepiece(
    input_jsonl: str,
    json_key: str,
    vocab_size: int,
    output_prefix: str,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 1 << 16,
    num_threads: int = 1,
) -> str:
    """Train a byte-fallback BPE sentencepiece model on one JSONL field; returns the `.model` path.

    Ids: unk=0, bos=1, eos=2 (the end-of-document token), no pad. Byte fallback needs room for the
    256 byte pieces plus every required character, so `vocab_size` must exceed roughly 260 plus the
    number of distinct characters kept by `character_coverage`.
    """
    import sentencepiece

    if not os.path.isfile(input_jsonl):
        raise UserError(f"input file not found: {input_jsonl}")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_jsonl_texts(input_jsonl, json_key),
        model_prefix=output_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=character_coverage,
        max_sentence_length=max_sentence_length,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=num_threads,
        minloglevel=2,
    )
    return f"{output_prefix}.model"
