"""The CLIP BPE tokenizer of SAM3's text encoder, built offline.

SAM3 tokenizes concept prompts with CLIP's byte-level BPE (vocabulary of 49,408 ids, 32 tokens per prompt,
``<|startoftext|>`` = 49406 first, ``<|endoftext|>`` = 49407 last and as padding). The vocabulary is defined
by the merges file ``bpe_simple_vocab_16e6.txt.gz`` that ships inside the ``open_clip_torch`` package, so no
download is needed: the vocabulary is rebuilt from it in the order CLIP's reference tokenizer uses

1. the 256 byte symbols (GPT-2's printable byte-to-unicode table, in byte-table order),
2. the same 256 symbols with the end-of-word marker ``</w>``,
3. one symbol per merge (the two halves joined), for the first 48,894 merges of the file,
4. ``<|startoftext|>`` and ``<|endoftext|>``,

and handed to ``transformers.CLIPTokenizer`` (the ``tokenizers``-backed implementation).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from medsam3.errors import ModelError

#: Tokens per prompt in SAM3 (text position embeddings: 32).
CONTEXT_LENGTH = 32
#: Number of merges CLIP keeps from the merges file (vocabulary 49,408 = 512 + 48,894 + 2).
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"


def byte_symbols() -> list[str]:
    """The 256 unicode symbols standing for the bytes 0..255, in CLIP's vocabulary order.

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves and come first;
    the remaining bytes are mapped, in increasing byte order, to code points 256, 257, ... so that no symbol
    is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in set(printable)]
    return [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]


def bpe_vocab_path() -> Path:
    """Path of the CLIP merges file bundled with ``open_clip_torch``."""
    spec = importlib.util.find_spec("open_clip")  # located, not imported (importing it loads torch, timm)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the CLIP tokenizer vocabulary comes from the package open_clip_torch, which is not installed "
            "(pip install open_clip_torch)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE_NAME
    if not path.is_file():
        raise ModelError(f"{path}: CLIP BPE vocabulary file missing from the open_clip_torch installation")
    return path


@lru_cache(maxsize=2)
def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary (token -> id, 49,408 entries) and its ordered merges, read from the BPE file."""
    path = Path(bpe_path) if bpe_path is not None else bpe_vocab_path()
    try:
        lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the CLIP BPE vocabulary ({exc})") from exc
    # Line 0 is a version header; CLIP keeps the next NUM_MERGES lines.
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ModelError(f"{path}: not a CLIP BPE merges file ({len(merges)} merges, expected {NUM_MERGES})")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"{path}: the CLIP vocabulary rebuilt from this file has duplicate tokens")
    return vocab, merges  # type: ignore[return-value]


def write_vocab_files(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (the files of a CLIP BPE tokenizer) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(" ".join(m) for m in merges)]
    merges_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def build_clip_tokenizer(save_dir: str | Path | None = None):
    """SAM3's text tokenizer (``transformers.CLIPTokenizer``), built from the bundled BPE file, offline.

    The tokenizer lower-cases, adds ``<|startoftext|>`` / ``<|endoftext|>`` and pads with ``<|endoftext|>``;
    ``model_max_length`` is 32, SAM3's text context. With ``save_dir`` the tokenizer files
    (``tokenizer.json``, ``tokenizer_config.json``, ...) are also written there.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # In-memory vocab/merges go in as ``vocab=`` / ``merges=``: the ``vocab_file=`` / ``merges_file=``
    # keywords are not read by this constructor and would leave an empty vocabulary. The merges are
    # (left, right) pairs, which the BPE model takes although the constructor annotates ``list[str]``.
    pairs = [tuple(m) for m in merges]
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=CONTEXT_LENGTH)  # type: ignore[arg-type]
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer
