"""The quick-start corpus: English text that every CPython installation carries, so a first run needs no download.

Documents are the pydoc topic pages (`pydoc_data.topics`) and, per standard-library module, its docstrings
joined together: about 2 MB of technical English. The tokenizer is trained on it with the challenge's recipe
and the shards are written in the challenge's format, once; later calls reuse them.

    python -m data.default_corpus        # -> data/datasets/default_sp1024/, data/tokenizers/default_1024_bpe.model

The text differs slightly between Python versions, so its scores are smoke-test figures, not research numbers.
"""
import argparse
import ast
import random
import sys
import sysconfig
from pathlib import Path

from data.prepare import PrepareError, summary_lines, train_tokenizer, write_splits

# Folders of the standard library whose docstrings are tests, demos or vendored code rather than documentation.
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo", "ensurepip"}
MIN_DOCUMENT_CHARS = 200


def module_docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return "\n\n".join(doc for doc in map(ast.get_docstring, nodes) if doc)


def stdlib_documents(seed: int = 0) -> list[str]:
    """Every document once, in a seeded random order so that the first ones (the val split) are a sample."""
    from pydoc_data.topics import topics

    documents = [topics[key] for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]):
            documents.append(module_docstrings(path))
    documents = [d.strip() for d in documents if len(d.strip()) >= MIN_DOCUMENT_CHARS]
    random.Random(seed).shuffle(documents)
    return documents


def build_default_corpus(output_dir: Path, tokenizer_path: Path, vocab_size: int = 1024, val_fraction: float = 0.05) -> dict | None:
    """Build shards and tokenizer unless both are already there; return the split summary, or None if reused."""
    if tokenizer_path.exists() and any(output_dir.glob("fineweb_val_*.bin")) and any(output_dir.glob("fineweb_train_*.bin")):
        return None
    documents = stdlib_documents()
    val_documents = max(1, int(len(documents) * val_fraction))
    tokenizer_path.parent.mkdir(parents=True, exist_ok=True)
    # The tokenizer sees only the train documents, as a real pipeline would.
    train_tokenizer(documents[val_documents:], tokenizer_path, vocab_size)
    return write_splits(documents, output_dir, tokenizer_path, val_documents)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("data/datasets/default_sp1024"),
                        help="shards folder (default: %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=Path("data/tokenizers/default_1024_bpe.model"),
                        help="SentencePiece model to write (default: %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=1024, help="default: %(default)s")
    args = parser.parse_args()
    try:
        summary = build_default_corpus(args.output, args.tokenizer, args.vocab_size)
    except (PrepareError, OSError) as error:
        sys.exit("error: " + " ".join(str(error).split()))
    print(f"default_corpus:{'reused' if summary is None else 'built'} data_path:{args.output} tokenizer_path:{args.tokenizer}")
    if summary is not None:
        print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    main()
