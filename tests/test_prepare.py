"""Tests for data/prepare.py: shards that both readers accept, exact document round trips, the val/train split,
mixed input formats, the .txt document modes, determinism across seeds and worker counts, and the refusals."""
import contextlib
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402
import zstandard  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402

from data import prepare  # noqa: E402
from data.shards import read_shard  # noqa: E402

WORDS = ("the a of and model data shard token val train expert router golf byte piece budget "
         "Seven Paris compress, quickly; fine-web 42 2024 3.14 (note) tiny: large!").split()
SHARD_TOKENS = 1500
VAL_DOCS = 40


def make_documents(count: int, seed: int, tag: str) -> list[str]:
    """Unique plain-ASCII documents with single spaces, so nmt_nfkc normalization leaves them unchanged."""
    rng = np.random.default_rng(seed)
    return [f"{tag} {i} " + " ".join(rng.choice(WORDS, size=rng.integers(5, 60))) + "." for i in range(count)]


def write_jsonl_zst(path: Path, texts: list[str]) -> Path:
    lines = "".join(json.dumps({"text": t, "source": "test"}) + "\n" for t in texts)
    path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return path


def run_main(argv: list[str]) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        prepare.main([str(a) for a in argv])
    return out.getvalue().splitlines()


def split_documents(tokens: np.ndarray) -> list[np.ndarray]:
    assert tokens[0] == 1, "the stream must start with BOS"
    starts = np.flatnonzero(tokens == 1)
    return np.split(tokens, starts[1:])


def split_stream(folder: Path, split: str) -> tuple[list[Path], np.ndarray]:
    paths = sorted(folder.glob(f"fineweb_{split}_*.bin"))
    return paths, np.concatenate([read_shard(p) for p in paths])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    first, second = make_documents(60, 0, "alpha"), make_documents(90, 1, "beta")
    zst = write_jsonl_zst(folder / "first.jsonl.zst", first)
    txt = folder / "second.txt"
    txt.write_text("\n".join(second) + "\n\n")  # the blank line is not a document
    return folder, [zst, txt], first + second


@pytest.fixture(scope="module")
def prepared(corpus):
    folder, inputs, documents = corpus
    output, tokenizer = folder / "shards", folder / "tokenizers" / "test_400_bpe.model"
    lines = run_main(["--input", *inputs, "--output", output, "--tokenizer-out", tokenizer, "--vocab-size", 400,
                      "--val-docs", VAL_DOCS, "--shard-tokens", SHARD_TOKENS, "--workers", 2, "--seed", 7])
    summary = {}
    for line in lines:
        fields = dict(field.split(":", 1) for field in line.split())
        if "split" in fields:
            summary[fields.pop("split")] = fields
    return output, tokenizer, documents, summary


def test_shards_load_in_both_readers(prepared):
    import torch
    import train_moe

    output, *_ = prepared
    for split in ("val", "train"):
        paths, _ = split_stream(output, split)
        for path in paths:
            loaded = train_moe.load_data_shard(path)
            assert loaded.dtype == torch.uint16 and loaded.ndim == 1
            np.testing.assert_array_equal(loaded.to(torch.int32).numpy(), read_shard(path))
        assert all(len(read_shard(p)) == SHARD_TOKENS for p in paths[:-1]) and len(read_shard(paths[-1])) > 0


def test_documents_round_trip_and_split_by_document(prepared):
    output, tokenizer, documents, _ = prepared
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    decode = lambda tokens: [sp.decode(doc[1:].tolist()) for doc in split_documents(tokens)]  # noqa: E731
    val = decode(split_stream(output, "val")[1])
    train = decode(split_stream(output, "train")[1])
    assert val == documents[:VAL_DOCS]  # the first documents of the first input, in order
    assert sorted(train) == sorted(documents[VAL_DOCS:])  # the rest, each exactly once
    assert train != documents[VAL_DOCS:]  # shuffled, and .jsonl.zst and .txt documents mixed
    assert {d.split()[0] for d in train[:20]} == {"alpha", "beta"}


def test_summary_matches_shards(prepared):
    output, tokenizer, documents, summary = prepared
    is_byte = np.array([spm.SentencePieceProcessor(model_file=str(tokenizer)).is_byte(i) for i in range(400)])
    for split, docs in (("val", documents[:VAL_DOCS]), ("train", documents[VAL_DOCS:])):
        paths, tokens = split_stream(output, split)
        stats = summary[split]
        utf8_bytes = sum(len(d.encode()) for d in docs)
        assert int(stats["documents"]) == len(docs) and int(stats["shards"]) == len(paths)
        assert int(stats["tokens"]) == len(tokens) and int(stats["bytes"]) == utf8_bytes
        assert float(stats["bytes_per_token"]) == pytest.approx(utf8_bytes / len(tokens), abs=1e-3)
        assert float(stats["byte_fallback_share"]) == pytest.approx(is_byte[tokens].mean(), abs=1e-5)
        assert float(stats["bos_share"]) == pytest.approx((tokens == 1).mean(), abs=1e-5)  # one BOS per document
        assert float(stats["bos_share"]) == pytest.approx(len(docs) / len(tokens), abs=1e-5)


def test_trained_tokenizer_follows_the_recipe(prepared):
    _, tokenizer, _, _ = prepared
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert all(sp.is_byte(i) and sp.id_to_piece(i) == f"<0x{i - 4:02X}>" for i in range(4, 260))
    unseen = "Жук"  # never in training: byte fallback must carry it through, not <unk>
    ids = sp.encode(unseen)
    assert any(4 <= i < 260 for i in ids) and 3 not in ids and sp.decode(ids) == unseen
    assert len(sp.encode("2024")) == 4  # split_digits
    model = sentencepiece_model_pb2.ModelProto.FromString(tokenizer.read_bytes())
    spec, normalizer = model.trainer_spec, model.normalizer_spec
    assert (spec.model_type, spec.vocab_size, spec.character_coverage) == (spec.BPE, 400, pytest.approx(0.999))
    assert (normalizer.name, normalizer.add_dummy_prefix) == ("nmt_nfkc", False)


def test_same_output_for_a_seed_and_any_worker_count(prepared, tmp_path, monkeypatch):
    _, tokenizer, documents, _ = prepared
    monkeypatch.setattr(prepare, "BATCH_DOCS", 4)  # many batches in flight at once across the workers
    runs = {}
    for name, seed, workers in (("one", 3, 1), ("two", 3, 2), ("other_seed", 4, 2)):
        prepare.write_splits(documents, tmp_path / name, tokenizer, 10, seed=seed, shard_tokens=700, workers=workers)
        runs[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}
    assert runs["one"] == runs["two"]
    assert {k: v for k, v in runs["other_seed"].items() if "_val_" in k} == {
        k: v for k, v in runs["one"].items() if "_val_" in k}
    assert runs["other_seed"] != runs["one"]
    pieces = []
    for i in range(2):
        model = prepare.train_tokenizer(iter(documents), tmp_path / f"again{i}.model", 400)
        assert model.with_suffix(".vocab").is_file()
        sp = spm.SentencePieceProcessor(model_file=str(model))
        pieces.append([sp.id_to_piece(j) for j in range(sp.vocab_size())])
    assert pieces[0] == pieces[1]


def test_refuses_a_non_empty_output_folder(corpus, tmp_path):
    _, inputs, _ = corpus
    output = tmp_path / "shards"
    output.mkdir()
    (output / "fineweb_train_000000.bin").write_bytes(b"old")
    (output / "fineweb_train_000099.bin").write_bytes(b"stale")  # a rerun must not leave it for the loader
    tokenizer = tmp_path / "tok.model"
    argv = ["--input", *inputs, "--output", output, "--tokenizer-out", tokenizer, "--val-docs", 5,
            "--vocab-size", 400, "--workers", 1]
    result = subprocess.run([sys.executable, "-m", "data.prepare", *map(str, argv)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and "--overwrite" in result.stderr
    assert not tokenizer.exists() and (output / "fineweb_train_000000.bin").read_bytes() == b"old"
    run_main(argv + ["--overwrite"])
    assert read_shard(output / "fineweb_train_000000.bin")[0] == 1
    assert not (output / "fineweb_train_000099.bin").exists()


def test_clear_errors(corpus, tmp_path):
    _, inputs, documents = corpus
    (tmp_path / "blank.txt").write_text("\n \n")
    wrong_ids = tmp_path / "wrong_ids"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(documents), model_prefix=str(wrong_ids), vocab_size=200,
                                   model_type="bpe", minloglevel=2)  # sentencepiece's default ids: unk 0, no pad
    base = ["--output", tmp_path / "out", "--val-docs", 5, "--workers", 1]
    cases = [
        (["--input", tmp_path / "missing.jsonl", "--tokenizer-out", tmp_path / "t.model"], "not found"),
        (["--input", tmp_path / "blank.txt", "--tokenizer-out", tmp_path / "t.model"], "holds no documents"),
        (["--input", *inputs, "--tokenizer", f"{wrong_ids}.model"], "'unk': 0"),
        (["--input", *inputs, "--tokenizer-out", tmp_path / "t.model", "--vocab-size", 70000], "uint16"),
        (["--input", *inputs, "--tokenizer-out", tmp_path / "t.model", "--text-column", "body"], "no column 'body'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_main(argv + base)
        assert str(exit_info.value.code).startswith("error: ") and message in exit_info.value.code, argv
        assert not (tmp_path / "out").exists()


def test_reads_json_and_parquet_with_another_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_documents(6, 2, "gamma")
    pq.write_table(pa.table({"body": texts[:3], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    (tmp_path / "b.json").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts[3:]))
    (tmp_path / "c.json").write_text(json.dumps([{"body": t, "n": 1} for t in texts[:2]], indent=1))  # an array
    inputs = [str(tmp_path / "a.parquet"), str(tmp_path / "b.json"), str(tmp_path / "c.json")]
    prepare._check_inputs(inputs + ["HuggingFaceFW/fineweb:sample-10BT"])  # hub names pass the file checks
    assert list(prepare._read_documents(inputs, "body")) == texts + texts[:2]


# Blank-line runs, whitespace-only lines, leading and trailing blank lines, CRLF and LF line ends mixed.
TXT = "\r\n  \r\nfirst para line one\r\nline two\r\n\r\n \t \r\n\r\nsecond para\n\n\nthird para  \n  indented\n\n \n"
TXT_DOCUMENTS = {
    "line": ["first para line one", "line two", "second para", "third para  ", "  indented"],
    "paragraph": ["first para line one\nline two", "second para", "third para  \n  indented"],
    "file": ["first para line one\nline two\n\n \t \n\nsecond para\n\n\nthird para  \n  indented"],
}


def test_txt_documents_per_line_paragraph_or_file(tmp_path):
    path = tmp_path / "play.txt"
    path.write_bytes(TXT.encode())
    for mode, expected in TXT_DOCUMENTS.items():
        assert list(prepare._read_documents([str(path)], "text", mode)) == expected, mode
    assert list(prepare._read_documents([str(path)], "text")) == TXT_DOCUMENTS["line"]  # the default
    gz = tmp_path / "play.txt.gz"
    gz.write_bytes(gzip.compress(TXT.encode()))
    assert list(prepare._read_documents([str(gz)], "text", "paragraph")) == TXT_DOCUMENTS["paragraph"]
    jsonl = tmp_path / "rows.jsonl"  # the option leaves other inputs alone
    jsonl.write_text(json.dumps({"text": "a\n\nb"}) + "\n")
    assert list(prepare._read_documents([str(jsonl)], "text", "paragraph")) == ["a\n\nb"]


def test_txt_documents_set_the_bos_count(prepared, tmp_path):
    _, tokenizer, _, _ = prepared
    inputs = [tmp_path / "one.txt", tmp_path / "two.txt"]
    for path in inputs:
        path.write_bytes(TXT.encode())
    for mode, expected in TXT_DOCUMENTS.items():
        output = tmp_path / mode
        lines = run_main(["--input", *inputs, "--txt-documents", mode, "--output", output, "--tokenizer", tokenizer,
                          "--val-docs", 1, "--workers", 1])
        assert lines[0] == f"prepare:start inputs:2 max_docs:None output:{output} tokenizer:{tokenizer} workers:1"
        summary = {fields.pop("split"): fields for fields in (dict(f.split(":", 1) for f in line.split())
                                                               for line in lines if line.startswith("split:"))}
        documents = 2 * len(expected)
        assert int(summary["val"]["documents"]) + int(summary["train"]["documents"]) == documents, mode
        tokens = np.concatenate([split_stream(output, split)[1] for split in ("val", "train")])
        assert (tokens == 1).sum() == documents, mode
        train_tokens = split_stream(output, "train")[1]
        assert float(summary["train"]["bos_share"]) == pytest.approx((documents - 1) / len(train_tokens), abs=1e-5)


def test_txt_documents_refuses_other_values(corpus, tmp_path, capsys):
    _, inputs, _ = corpus
    with pytest.raises(SystemExit) as exit_info:
        run_main(["--input", *inputs, "--txt-documents", "sentence", "--output", tmp_path / "out",
                  "--tokenizer-out", tmp_path / "t.model", "--val-docs", 5])
    assert exit_info.value.code == 2 and "invalid choice: 'sentence'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
