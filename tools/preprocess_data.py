"""Tokenize a JSONL corpus into megatron-core indexed datasets: OUT_{key}_document.{bin,idx}.

    python tools/preprocess_data.py --input F.jsonl --json-keys text --tokenizer-type sentencepiece \
        --tokenizer-model tok.model --output-prefix data/corpus --workers 4 --append-eod
"""

import argparse
import sys
from pathlib import Path

try:
    from megatron_mm.data.preprocess import format_summary, preprocess_jsonl
    from megatron_mm.data.tokenizer import TOKENIZER_TYPES
    from megatron_mm.errors import UserError
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_mm.data.preprocess import format_summary, preprocess_jsonl
    from megatron_mm.data.tokenizer import TOKENIZER_TYPES
    from megatron_mm.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys to tokenize, one dataset each")
    parser.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model, tokenizer.json or HF dir")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX_{key}_document.{bin,idx}")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--append-eod", action="store_true", help="end every document with the EOS token")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        summary = preprocess_jsonl(
            args.input,
            args.json_keys,
            args.tokenizer_type,
            args.tokenizer_model,
            args.output_prefix,
            workers=args.workers,
            append_eod=args.append_eod,
            progress=not args.no_progress,
        )
    except (UserError, OSError) as err:  # bad input, or an output path that cannot be written
        sys.exit(f"error: {err}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
