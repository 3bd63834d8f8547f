"""Artifacts detect corruption: the trainer's reader, scripts/sample.py and scripts/export_hf.py refuse a changed byte
anywhere in the file, an edited header or model setting, an artifact from before the checksum, and a header that does
not describe its content: one `error:` line naming the file, exit 1, nothing written. (The trainer reading back its
own artifact: tests/test_failures.py.)"""
import json
import re
import sys

import pytest

import train_moe as tm
from conftest import REPO
from test_export_hf import make_artifact
from test_tool_errors import tree

sys.path.insert(0, str(REPO / "scripts"))
import export_hf  # noqa: E402
import sample  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    """An artifact as the trainer packs it, of a model whose settings differ from the defaults (NORM_TOPK_PROB=1)."""
    return make_artifact(tmp_path_factory.mktemp("integrity") / "good.moe", "softmax_norm_untied").read_bytes()


def flip(data: bytes, offset: int) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= 0xFF
    return bytes(changed)


def edited(old: bytes, new: bytes):
    """A change inside the content, compressed again: the file decompresses, only the hash can tell."""
    def make(blob: bytes) -> bytes:
        content = tm.decompress(blob)
        assert content.count(old) == 1
        return tm.compress(content.replace(old, new))
    return make


def resealed(change):
    """The header changed and sealed again with a matching hash, as another writer might: the header must still be
    checked against the content and the model."""
    def make(blob: bytes) -> bytes:
        content = tm.unseal(tm.decompress(blob))
        n = int.from_bytes(content[:4], "little")
        meta = json.loads(content[4:4 + n])
        change(meta)
        header = json.dumps(meta).encode()
        return tm.compress(tm.seal(len(header).to_bytes(4, "little") + header + content[4 + n:]))
    return make


CORRUPT = "corrupt"
MISMATCH = "corrupt: its content does not match the SHA-256 it was written with"
HEADER = "its header does not describe its content"
# Each case: the artifact's bytes -> the changed bytes, the start of the message after the file's name, and whether the
# trainer's read_artifact refuses it too (the model settings and shapes are checked where a model is built from them).
CASES = {
    "first byte flipped": (lambda b: flip(b, 0), CORRUPT, True),
    "frame header byte flipped": (lambda b: flip(b, 5), CORRUPT, True),
    "byte 100 flipped": (lambda b: flip(b, 100), CORRUPT, True),
    "byte a third in flipped": (lambda b: flip(b, len(b) // 3), CORRUPT, True),
    "middle byte flipped": (lambda b: flip(b, len(b) // 2), CORRUPT, True),
    "byte 5 from the end flipped": (lambda b: flip(b, len(b) - 5), CORRUPT, True),
    "last byte flipped": (lambda b: flip(b, len(b) - 1), CORRUPT, True),
    "cut in half": (lambda b: b[:len(b) // 2], "corrupt: truncated", True),
    "a byte appended": (lambda b: b + b"\0", CORRUPT, True),
    "empty": (lambda b: b"", "corrupt, or not a moe-golf artifact", True),
    "weight byte changed inside": (lambda b: tm.compress(flip(tm.decompress(b), -100)), MISMATCH, True),
    "hash byte changed inside": (lambda b: tm.compress(flip(tm.decompress(b), 20)), MISMATCH, True),
    "NORM_TOPK_PROB edited": (edited(b'"NORM_TOPK_PROB":"1"', b'"NORM_TOPK_PROB":"0"'), MISMATCH, True),
    "LOGIT_SOFTCAP edited": (edited(b'"LOGIT_SOFTCAP":"30.0"', b'"LOGIT_SOFTCAP":"15.0"'), MISMATCH, True),
    "tensor shape edited": (edited(b'"tok_emb.weight":{"kind":"int","bits":8,"shape":[64,32]}',
                                   b'"tok_emb.weight":{"kind":"int","bits":8,"shape":[32,64]}'), MISMATCH, True),
    "written before checksums": (lambda b: tm.compress(tm.UNCHECKED_MAGIC + tm.unseal(tm.decompress(b))),
                                 "written before artifacts carried a checksum (MOEGOLF1)", True),
    "another format": (lambda b: tm.compress(b"NOTMOE01" + tm.decompress(b)[8:]), "corrupt, or not a moe-golf", True),
    "header without model settings": (resealed(lambda m: m.pop("model")), f"{HEADER} (KeyError: 'model')", True),
    "header without arrays": (resealed(lambda m: m.pop("arrays")), f"{HEADER} (KeyError: 'arrays')", True),
    "tensor without kind": (resealed(lambda m: m["tensors"]["tok_emb.weight"].pop("kind")), HEADER, True),
    "tensor without its array": (resealed(lambda m: m["tensors"].update(extra={"kind": "float", "shape": [2]})), HEADER,
                                 True),
    "tensor of another size": (resealed(lambda m: m["tensors"]["tok_emb.weight"].update(shape=[64, 31])), HEADER, True),
    "array of another size": (resealed(lambda m: m["arrays"]["tok_emb.weight"].update(shape=[64, 33])), HEADER, True),
    "array of no dtype": (resealed(lambda m: m["arrays"]["tok_emb.weight"].update(dtype="<q7")), HEADER, True),
    "model settings a list": (resealed(lambda m: m.update(model=["MLP_MODE"])), HEADER, True),
    "model setting a number": (resealed(lambda m: m["model"].update(NUM_LAYERS=4)), HEADER, True),
    "tensor shape transposed": (resealed(lambda m: m["tensors"]["blocks.0.attn.q.weight"].update(shape=[16, 64])),
                                "its tensors do not fit train_moe.py's model", False),
    "model setting out of range": (resealed(lambda m: m["model"].update(MLP_MODE="huge")), "MLP_MODE='huge': allowed",
                                   False),
    "model settings empty": (resealed(lambda m: m.update(model={})), "the artifact has no model settings", False),
}


def test_the_unchanged_artifact_loads(good, tmp_path):
    (tmp_path / "good.moe").write_bytes(good)
    cfg, model = sample.load_model(tmp_path / "good.moe")
    assert cfg.norm_topk_prob == 1 and cfg.logit_softcap == 30.0 and not model.training


IN_TRAINER = {name: case[:2] for name, case in CASES.items() if case[2]}


@pytest.mark.parametrize("make, message", IN_TRAINER.values(), ids=IN_TRAINER)
def test_the_trainers_reader_refuses(make, message, good):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        tm.read_artifact(make(good))


@pytest.mark.parametrize("tool", ["sample.py", "export_hf.py"])
@pytest.mark.parametrize("make, message, in_trainer", CASES.values(), ids=CASES)
def test_the_tools_refuse(make, message, in_trainer, tool, good, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "changed.moe"
    path.write_bytes(make(good))
    before = tree(tmp_path)
    if tool == "sample.py":
        code = sample.main([str(path), "--prompt", "The", "--tokenizer", "no.model"])
    else:
        code = export_hf.main([str(path), "--out", str(tmp_path / "hf")])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 1 and captured.out == "" and len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path}: {message}"), lines[0]
    assert tree(tmp_path) == before
