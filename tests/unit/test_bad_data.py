"""Bad data is refused in one line naming the file: truncated or empty indexed datasets (text and
multimodal), token ids beyond the model's vocabulary, tokenizers of the wrong type, preprocessing runs
that would write nothing; Windows byte-order marks are read, and skip summaries name the lines."""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

from megatron_mm.config import Config, DataConfig, TrainConfig
from megatron_mm.data import gpt_data, indexed_format, mm_indexed, vocab_check
from megatron_mm.data.gpt_data import build_gpt_datasets
from megatron_mm.data.indexed_format import IndexedWriter
from megatron_mm.data.mm_indexed import MediaRecord, MMIndexedDataset, MMIndexedWriter, MMSample, preprocess_mm
from megatron_mm.data.mm_training import build_mm_datasets
from megatron_mm.data.preprocess import REPORTED_LOCATIONS, format_summary, preprocess_jsonl
from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece
from megatron_mm.errors import UserError

REPO = Path(__file__).resolve().parents[2]
BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_data")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    docs = [inspect.getdoc(getattr(json, name)) for name in sorted(dir(json))] + [
        inspect.getdoc(getattr(os.path, name)) for name in sorted(dir(os.path))]
    return [doc for doc in dict.fromkeys(docs) if doc and len(doc) > 40]


@pytest.fixture(scope="module")
def corpus(workdir, texts) -> Path:
    path = workdir / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sentencepiece_model(workdir, corpus) -> str:
    return train_sentencepiece(str(corpus), "text", 400, str(workdir / "sp" / "tokenizer"))


@pytest.fixture(scope="module")
def tokenizer_json(workdir, texts) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                             show_progress=False))
    (workdir / "hf").mkdir()
    tokenizer.save(str(workdir / "hf" / "tokenizer.json"))
    return str(workdir / "hf" / "tokenizer.json")


@pytest.fixture(scope="module")
def prefix(workdir, corpus, sentencepiece_model) -> str:
    return preprocess_jsonl(str(corpus), ["text"], "sentencepiece", sentencepiece_model, str(workdir / "gpt" / "c"),
                            append_eod=True, progress=False)["outputs"]["text"]


def read_documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"tools/{tool}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def assert_one_error_line(result: subprocess.CompletedProcess, *named: str) -> str:
    """Non-zero exit, exactly one `error: ...` line on stderr naming every string of `named`."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def build_text(prefix: str, tokenizer, **kwargs):
    return build_gpt_datasets([prefix], "1,0,0", 16, 1, (4, 0, 0), tokenizer, **kwargs)


def copy_dataset(source: str, target: Path) -> str:
    for suffix in ("bin", "idx"):
        Path(f"{target}.{suffix}").write_bytes(Path(f"{source}.{suffix}").read_bytes())
    return str(target)


# --- the indexed format, written without megatron-core ------------------------------------------------------

@pytest.mark.parametrize("vocab_size", [400, 70000])  # uint16 and int32 datasets
def test_writer_is_byte_identical_to_megatron_core_builder(vocab_size, tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    rng = numpy.random.default_rng(vocab_size)
    documents = [rng.integers(0, vocab_size, int(rng.integers(1, 50))) for _ in range(30)]
    ours = IndexedWriter(str(tmp_path / "ours.bin"), indexed_format.optimal_dtype(vocab_size))
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=DType.optimal_dtype(vocab_size))
    for document in documents:
        ours.add_document(document)
        theirs.add_document(numpy.asarray(document, dtype=theirs.dtype), [len(document)])
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in ("bin", "idx"):
        assert (tmp_path / f"ours.{suffix}").read_bytes() == (tmp_path / f"theirs.{suffix}").read_bytes()


def test_preprocess_tool_does_not_import_megatron_core(corpus, sentencepiece_model, tmp_path):
    out = tmp_path / "out"
    script = ("import runpy, sys\n"
              f"sys.argv = ['preprocess_data.py', '--input', {str(corpus)!r}, '--tokenizer-type', 'sentencepiece', "
              f"'--tokenizer-model', {sentencepiece_model!r}, '--output-prefix', {str(out)!r}, '--no-progress']\n"
              "runpy.run_path('tools/preprocess_data.py', run_name='__main__')\n"
              "print('megatron.core imported:', 'megatron.core' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "megatron.core imported: False" in result.stdout
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    assert read_documents(f"{out}_text_document") == [tokenizer.tokenize(text) for text in texts]


# --- preprocessing: BOMs, skip locations, runs that write nothing -----------------------------------------------

def test_lines_with_a_byte_order_mark_are_read(texts, sentencepiece_model, tmp_path):
    corpus = tmp_path / "windows.jsonl"
    # A BOM starts the file, and every line of files concatenated from Windows tools; CRLF endings.
    corpus.write_bytes(b"".join(BOM + json.dumps({"text": text}).encode() + b"\r\n" for text in texts[:5]))
    summary = preprocess_jsonl(str(corpus), ["text"], "sentencepiece", sentencepiece_model, str(tmp_path / "out"),
                               progress=False)
    assert summary["skipped"] == {} and summary["docs"] == 5
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    assert read_documents(summary["outputs"]["text"]) == [tokenizer.tokenize(text) for text in texts[:5]]


def test_skip_summary_names_the_first_lines_of_each_reason(sentencepiece_model, tmp_path):
    good, bad_json, blank = json.dumps({"text": "A good document."}), "{not json", ""
    lines = [good, bad_json, good, blank, *[bad_json] * (REPORTED_LOCATIONS + 2), good, json.dumps({"other": 1})]
    corpus = tmp_path / "mixed.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = preprocess_jsonl(str(corpus), ["text"], "sentencepiece", sentencepiece_model, str(tmp_path / "out"),
                               workers=2, lines_per_chunk=3, progress=False)
    numbers = {kind: [n for n, line in enumerate(lines, start=1) if line == kind] for kind in (bad_json, blank)}
    assert summary["skipped_at"] == {"blank_line": numbers[blank],
                                     "malformed_json": numbers[bad_json][:REPORTED_LOCATIONS],
                                     "missing_key": [len(lines)]}
    report = format_summary(summary)
    first = ", ".join(map(str, numbers[bad_json][:REPORTED_LOCATIONS]))
    assert f"malformed_json: {len(numbers[bad_json])} (lines {first}, ...)" in report
    assert f"blank_line: 1 (line {numbers[blank][0]})" in report
    assert f"missing_key: 1 (line {len(lines)})" in report


@pytest.mark.parametrize("content", [b'{"text": 5}\nnot json\n\n{"other": "x"}\n', b""], ids=["all_bad", "empty"])
def test_preprocess_that_writes_nothing_fails(content, sentencepiece_model, tmp_path):
    corpus = tmp_path / "nothing.jsonl"
    corpus.write_bytes(content)
    result = run_tool("preprocess_data.py", "--input", str(corpus), "--tokenizer-type", "sentencepiece",
                      "--tokenizer-model", sentencepiece_model, "--output-prefix", str(tmp_path / "out"),
                      "--no-progress")
    line = assert_one_error_line(result, str(corpus), "no document written")
    if content:
        assert "not_a_string: 1 (line 1)" in line and "malformed_json: 1 (line 2)" in line
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out*"))


def truncated(path: str, target: Path) -> str:
    data = Path(path).read_bytes()
    target.write_bytes(data[:len(data) // 2])
    return str(target)


@pytest.fixture
def tokenizer_cases(sentencepiece_model, tokenizer_json, tmp_path) -> dict:
    """case -> (tokenizer type, path, what the error says)"""
    hf_dir = Path(tokenizer_json).parent
    return {
        "sentencepiece_as_huggingface": ("huggingface", sentencepiece_model, "is a sentencepiece model"),
        "tokenizer_json_as_sentencepiece": ("sentencepiece", tokenizer_json, "use tokenizer type huggingface"),
        "hf_directory_as_sentencepiece": ("sentencepiece", str(hf_dir), "is a directory"),
        "truncated_sentencepiece": ("sentencepiece", truncated(sentencepiece_model, tmp_path / "cut.model"),
                                    "not a readable sentencepiece model"),
        "truncated_tokenizer_json": ("huggingface", truncated(tokenizer_json, tmp_path / "cut.json"),
                                     "not a readable Hugging Face tokenizer.json"),
    }


@pytest.mark.parametrize("case", ["sentencepiece_as_huggingface", "tokenizer_json_as_sentencepiece",
                                  "hf_directory_as_sentencepiece", "truncated_sentencepiece",
                                  "truncated_tokenizer_json"])
def test_wrong_or_truncated_tokenizer_is_one_line(case, tokenizer_cases, corpus, tmp_path):
    tokenizer_type, path, says = tokenizer_cases[case]
    with pytest.raises(UserError, match=says):
        build_tokenizer(tokenizer_type, path)
    result = run_tool("preprocess_data.py", "--input", str(corpus), "--tokenizer-type", tokenizer_type,
                      "--tokenizer-model", path, "--output-prefix", str(tmp_path / "out"), "--no-progress")
    assert_one_error_line(result, path, says)
    assert not list(tmp_path.glob("out*"))


# --- text datasets at build time ---------------------------------------------------------------------------------

def test_truncated_or_empty_text_datasets_are_refused(prefix, sentencepiece_model, tmp_path):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    build_text(prefix, tokenizer)  # the intact dataset builds
    bin_cut = copy_dataset(prefix, tmp_path / "bin_cut")
    truncated(f"{prefix}.bin", Path(f"{bin_cut}.bin"))
    idx_cut = copy_dataset(prefix, tmp_path / "idx_cut")
    truncated(f"{prefix}.idx", Path(f"{idx_cut}.idx"))
    header_cut = copy_dataset(prefix, tmp_path / "header_cut")
    Path(f"{header_cut}.idx").write_bytes(Path(f"{prefix}.idx").read_bytes()[:20])
    empty = str(tmp_path / "empty")
    IndexedWriter(f"{empty}.bin", numpy.uint16).finalize(f"{empty}.idx")
    for bad, file, says in [(bin_cut, f"{bin_cut}.bin", "is truncated"), (idx_cut, f"{idx_cut}.idx", "is truncated"),
                            (header_cut, f"{header_cut}.idx", "shorter than the"),
                            (empty, f"{empty}.idx", "holds no document")]:
        with pytest.raises(UserError, match=says) as raised:
            build_text(bad, tokenizer)
        assert file in str(raised.value) and "\n" not in str(raised.value)


def test_weighted_blend_with_a_truncated_index_is_refused_when_training_builds_it(prefix, sentencepiece_model,
                                                                                    tmp_path):
    from megatron_mm.training.batches import build_datasets

    cut = copy_dataset(prefix, tmp_path / "cut")
    truncated(f"{prefix}.idx", Path(f"{cut}.idx"))
    cfg = Config(model=SimpleNamespace(vocab_size=None),
                 data=DataConfig(blend=["0.5", prefix, "0.5", cut], split="1,0,0", seq_length=16),
                 train=TrainConfig(seed=1))
    with pytest.raises(UserError, match=f"{cut}.idx is truncated"):
        build_datasets(cfg, build_tokenizer("sentencepiece", sentencepiece_model), (4, 0, 0))


def test_ids_beyond_the_vocabulary_are_refused(prefix, sentencepiece_model, tmp_path):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    largest = max(max(document) for document in read_documents(prefix))
    data = copy_dataset(prefix, tmp_path / "data")
    build_text(data, tokenizer, vocab_size=largest + 1)
    with pytest.raises(UserError) as raised:
        build_text(data, tokenizer, vocab_size=largest)
    message = str(raised.value)
    assert message.startswith(f"{data}: largest token id {largest} ") and f"model.vocab_size={largest}" in message


def test_largest_id_is_cached_until_the_files_change(prefix, sentencepiece_model, tmp_path, monkeypatch):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    data = copy_dataset(prefix, tmp_path / "data")
    largest = max(max(document) for document in read_documents(data))
    build_text(data, tokenizer, vocab_size=largest + 1)
    assert json.loads(Path(data + vocab_check.SIDECAR_SUFFIX).read_text())["max_token_id"] == largest

    def no_scan(*args):
        raise AssertionError("the .bin was scanned again")

    with monkeypatch.context() as patched:
        patched.setattr(gpt_data, "max_token_id", no_scan)
        build_text(data, tokenizer, vocab_size=largest + 1)  # answered from the sidecar file
    # Same size, new content: the first token becomes an id beyond the vocabulary.
    ids = numpy.fromfile(f"{data}.bin", dtype=numpy.uint16)
    ids[0] = largest + 7
    ids.tofile(f"{data}.bin")
    stat = os.stat(f"{data}.bin")
    os.utime(f"{data}.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(UserError, match=f"largest token id {largest + 7} "):
        build_text(data, tokenizer, vocab_size=largest + 1)


def test_unwritable_sidecar_still_checks(prefix, sentencepiece_model, tmp_path):
    tokenizer = build_tokenizer("sentencepiece", sentencepiece_model)
    data = copy_dataset(prefix, tmp_path / "data")
    largest = max(max(document) for document in read_documents(data))
    Path(data + vocab_check.SIDECAR_SUFFIX).mkdir()  # neither readable nor replaceable as a file
    with pytest.raises(UserError, match=f"largest token id {largest} "):
        build_text(data, tokenizer, vocab_size=largest)
    build_text(data, tokenizer, vocab_size=largest + 1)
    assert not list(tmp_path.glob("*.partial"))  # the unpublished sidecar is removed


# --- multimodal datasets ------------------------------------------------------------------------------------------

def write_mm_source(prefix: Path, texts: list[list[int]]) -> str:
    writer = MMIndexedWriter(f"{prefix}.bin")
    for text in texts:
        pixels = numpy.full((16, 16, 3), len(text), dtype=numpy.uint8)
        writer.add_sample(MMSample(numpy.asarray(text, dtype=numpy.int32), [MediaRecord("image", 0, pixels)]))
    writer.finalize(f"{prefix}.idx")
    return str(prefix)


class OnePatchImages:
    """One placeholder per image; its pixels as the media tensor."""

    modality, placeholder_id = "image", 1

    def __call__(self, image):
        import torch

        return {"pixels": torch.as_tensor(image, dtype=torch.float32).reshape(1, -1)[:, :8]}, 1


def mm_config(blend: list[str], vocab_size=None) -> Config:
    model = SimpleNamespace(vocab_size=vocab_size, placeholder_ids=lambda: {"image": 1})
    return Config(model=model, data=DataConfig(blend=blend, split="1,0,0", seq_length=32), train=TrainConfig(seed=1))


MM_TEXTS = [[5, 6, 7, 3], [9, 40, 3], [12, 13, 14, 15, 3]]


def test_truncated_empty_or_text_datasets_are_refused_as_multimodal(prefix, tmp_path):
    source = write_mm_source(tmp_path / "ok", MM_TEXTS)
    assert len(MMIndexedDataset(source)) == len(MM_TEXTS)
    bin_cut = copy_dataset(source, tmp_path / "bin_cut")
    truncated(f"{source}.bin", Path(f"{bin_cut}.bin"))
    idx_cut = copy_dataset(source, tmp_path / "idx_cut")
    truncated(f"{source}.idx", Path(f"{idx_cut}.idx"))
    header_cut = copy_dataset(source, tmp_path / "header_cut")
    Path(f"{header_cut}.idx").write_bytes(Path(f"{source}.idx").read_bytes()[:12])
    for bad, file, says in [(bin_cut, f"{bin_cut}.bin", "is truncated"), (idx_cut, f"{idx_cut}.idx", "is truncated"),
                            (header_cut, f"{header_cut}.idx", "shorter than the")]:
        with pytest.raises(UserError, match=says) as raised:
            MMIndexedDataset(bad)
        assert file in str(raised.value)
    with pytest.raises(UserError, match="it is a text dataset"):
        MMIndexedDataset(prefix)
    empty = write_mm_source(tmp_path / "empty", [])
    with pytest.raises(UserError, match="holds no sample") as raised:
        build_mm_datasets(mm_config([empty]), [OnePatchImages()], (2, 0, 0))
    assert f"{empty}.idx" in str(raised.value)


def test_multimodal_ids_beyond_the_vocabulary_are_refused(tmp_path):
    source = write_mm_source(tmp_path / "mm", MM_TEXTS)
    largest = max(max(text) for text in MM_TEXTS)
    assert MMIndexedDataset(source).max_token_id() == largest
    train, _, _ = build_mm_datasets(mm_config([source], vocab_size=largest + 1), [OnePatchImages()], (2, 0, 0))
    assert len(train) == 2
    with pytest.raises(UserError) as raised:
        build_mm_datasets(mm_config([source], vocab_size=largest), [OnePatchImages()], (2, 0, 0))
    assert str(raised.value).startswith(f"{source}: largest token id {largest} ")
    assert f"model.vocab_size={largest}" in str(raised.value)


@pytest.fixture(scope="module")
def images(workdir) -> list[str]:
    from megatron_mm.data import synthetic_mm

    return [json.loads(line)["images"][0] for line in
            synthetic_mm.write_synthetic_set(str(workdir / "synthetic"), 4, 0, seed=1).read_text().splitlines()]


def test_multimodal_manifest_with_byte_order_marks_and_skip_locations(workdir, images, tokenizer_json, tmp_path):
    records = [json.dumps({"text": f"picture {i}", "images": [f"synthetic/{path}"]}) for i, path in enumerate(images)]
    lines = [BOM + records[0].encode(), b"{broken", BOM + records[1].encode(), b'{"images": []}', *map(str.encode,
             records[2:])]
    manifest = workdir / "bom_manifest.jsonl"
    manifest.write_bytes(b"\r\n".join(lines) + b"\r\n")
    summary = preprocess_mm([str(manifest)], "huggingface", tokenizer_json, str(tmp_path / "out"), progress=False)
    assert summary["samples"] == len(records)
    assert summary["skipped_at"] == {"malformed_json": [2], "missing_text": [4]}
    assert "malformed_json: 1 (line 2)" in mm_indexed.format_summary(summary)


def test_multimodal_preprocess_that_writes_nothing_fails(workdir, tokenizer_json, tmp_path):
    manifest = workdir / "all_bad_manifest.jsonl"
    manifest.write_text('{"text": "missing image", "images": ["nope.png"]}\n[1]\n', encoding="utf-8")
    result = run_tool("preprocess_mm_data.py", "--input", str(manifest), "--tokenizer-type", "huggingface",
                      "--tokenizer-model", tokenizer_json, "--output-prefix", str(tmp_path / "out"), "--no-progress")
    line = assert_one_error_line(result, str(manifest), "no sample written")
    assert "missing_file: 1 (line 1)" in line and "not_an_object: 1 (line 2)" in line
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out*"))
