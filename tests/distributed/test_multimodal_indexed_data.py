"""Training from preprocessed multimodal data: the synthetic shape set through
tools/preprocess_mm_data.py's indexed format into the packed, dynamic-resolution dataset
(data/mm_training.py) feeds the Qwen2-VL-style model, and PP2 and TP2 reproduce the single-rank loss
on those sequences (several captioned images per packed sequence)."""

import json
from pathlib import Path

import pytest

from conftest import case, read_losses, run_cases
from test_parallel_equivalence import assert_same_losses

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_qwen2_vl.yaml"


@pytest.fixture(scope="module")
def indexed_data(tmp_path_factory) -> list[str]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_mm.data import synthetic_mm
    from megatron_mm.data.mm_indexed import preprocess_mm

    work = tmp_path_factory.mktemp("mm_indexed")
    manifest = synthetic_mm.write_synthetic_set(str(work / "synthetic"), 64, 0, seed=3)
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.save(str(work / "tokenizer.json"))
    summary = preprocess_mm([str(manifest)], "huggingface", str(work / "tokenizer.json"), str(work / "shapes"),
                            append_eod=True, progress=False)
    assert summary["samples"] == 64
    return ["data.mock=false", f"data.blend=[{work / 'shapes'}]", "data.tokenizer_type=huggingface",
            f"data.tokenizer_model={work / 'tokenizer.json'}", "data.split=90,10,0", "model.vocab_size=384",
            "model.image_token_id=383", "data.seq_length=64", "model.max_position_embeddings=64"]


LAYOUTS = {"pp2": ["parallel.pp=2"], "tp2": ["parallel.tp=2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, indexed_data):
    """Initial weights saved by one rank, that rank's losses and the layouts' from them: one launch
    per world size."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("init", "single", *LAYOUTS)}
    checkpoint = out["init"] / "checkpoints" / "iter_0000000"
    cases = {
        "init": case(1, out["init"], f"train.output_dir={out['init']}", *indexed_data, config=CONFIG,
                     flags=["--save-init"]),
        "single": case(1, out["single"], f"train.output_dir={out['single']}", f"train.init_from={checkpoint}",
                       *indexed_data, config=CONFIG),
    }
    for name, overrides in LAYOUTS.items():
        cases[name] = case(2, out[name], f"train.output_dir={out[name]}", f"train.init_from={checkpoint}",
                           *indexed_data, *overrides, config=CONFIG)
    return run_cases(cases)


def test_trains_on_indexed_data(runs):
    losses = read_losses(runs["single"])
    assert len(losses) == 5 and losses[5] < losses[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_rank(layout, runs):
    assert_same_losses(read_losses(runs["single"]), read_losses(runs[layout]))
