"""Train a byte-fallback BPE sentencepiece tokenizer on one field of a JSONL corpus; writes PREFIX.model.

    python tools/train_tokenizer.py --input data/corpus.jsonl --json-key text --vocab-size 8000 \
        --output-prefix data/tokenizer
"""

import argparse
import sys
from pathlib import Path

try:
    from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece
    from megatron_mm.errors import UserError
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece
    from megatron_mm.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one document per line")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        model_path = train_sentencepiece(
            args.input,
            args.json_key,
            args.vocab_size,
            args.output_prefix,
            character_coverage=args.character_coverage,
            num_threads=args.threads,
        )
    except (UserError, OSError) as err:
        sys.exit(f"error: {err}")
    except RuntimeError as err:  # sentencepiece reports bad settings (e.g. a vocab too small) this way
        sys.exit(f"error: {args.input}: {str(err).strip().splitlines()[-1]}")
    tokenizer = build_tokenizer("sentencepiece", model_path)
    print(f"wrote {model_path}: vocab_size={tokenizer.vocab_size} eod={tokenizer.eod}")


if __name__ == "__main__":
    main()
