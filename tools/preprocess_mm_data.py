"""Tokenize multimodal samples (image/audio + text) into one indexed dataset: OUT.{bin,idx}.

    python tools/preprocess_mm_data.py --input data/synthetic/manifest.jsonl --tokenizer-type huggingface \
        --tokenizer-model tokenizer.json --output-prefix data/synthetic_mm --workers 4 --append-eod
    python tools/preprocess_mm_data.py --input-format webdataset --input shards/*.tar ...

The format and the input conventions are described in megatron_mm/data/mm_indexed.py.
"""

import argparse
import sys
from pathlib import Path

try:
    import megatron_mm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mm.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before megatron-core is imported: some of them are raised at import

from megatron_mm.data.mm_indexed import INPUT_FORMATS, MEDIA_FORMATS, format_summary, preprocess_mm  # noqa: E402
from megatron_mm.data.tokenizer import TOKENIZER_TYPES  # noqa: E402
from megatron_mm.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help="JSONL manifest(s) or WebDataset .tar shards")
    parser.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl")
    parser.add_argument("--tokenizer-type", required=True, choices=sorted(TOKENIZER_TYPES))
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model, tokenizer.json or HF dir")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--media-format", choices=MEDIA_FORMATS, default="raw",
                        help="raw: the files' encoded bytes; pixels: images decoded to uint8 HxWx3")
    parser.add_argument("--workers", type=int, default=1, help="decoding/tokenizing processes")
    parser.add_argument("--append-eod", action="store_true", help="end every sample with the EOS token")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        summary = preprocess_mm(
            args.input,
            args.tokenizer_type,
            args.tokenizer_model,
            args.output_prefix,
            input_format=args.input_format,
            media_format=args.media_format,
            workers=args.workers,
            append_eod=args.append_eod,
            progress=not args.no_progress,
        )
    except (UserError, OSError) as err:  # bad input, or an output path that cannot be written
        sys.exit(f"error: {err}")
    print(format_summary(summary))


if __name__ == "__main__":
    main()
