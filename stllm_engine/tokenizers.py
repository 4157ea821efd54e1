"""Loading the two tokenizers of ST-LLM from local folders (never from a hub).

* LLaMA / Vicuna: ``tokenizer.json`` (fast) or, for a release folder holding only the
  SentencePiece ``tokenizer.model``, conversion through ``sentencepiece`` when it is installed.
* Q-Former: BERT-uncased WordPiece plus the ``[DEC]`` bos token the release adds
  (``init_tokenizer``), truncating from the left like the release's ``STLLMModel``.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

QFORMER_BOS = "[DEC]"


class TokenizerError(ValueError):
    """A tokenizer folder is missing or holds no usable tokenizer files."""


def _folder(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise TokenizerError(f"{what} tokenizer folder {p} does not exist")
    return p


def load_llama_tokenizer(folder: str | Path, instruction_specials: bool = False):
    """The LLaMA tokenizer of a checkpoint folder (BOS ``<s>`` added when encoding).

    ``instruction_specials``: apply what the release's ``STLLMModel`` does to its tokenizer for
    the instruction-aware (``qformer_text_input``) checkpoints: add ``[PAD]`` as a new pad token
    (vocab + 1, e.g. 32001) and make ``</s>`` the bos, eos and unk token, so encoding prepends
    id 2 instead of 1 (the slow tokenizer there prepends ``bos_token_id``).
    """
    from transformers import LlamaTokenizer

    p = _folder(folder, "LLaMA")
    if (p / "tokenizer.json").is_file():
        pass
    elif (p / "tokenizer.model").is_file():
        if importlib.util.find_spec("sentencepiece") is None:
            raise TokenizerError(f"{p} has only a SentencePiece tokenizer.model; reading it needs the "
                                 "'sentencepiece' package (pip install sentencepiece), or add a "
                                 "tokenizer.json to the folder")
    else:
        raise TokenizerError(f"no LLaMA tokenizer in {p}: expected tokenizer.json or tokenizer.model")
    try:
        tok = LlamaTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:
        raise TokenizerError(f"cannot load the LLaMA tokenizer in {p}: {type(e).__name__}: {e}") from e
    if tok.bos_token_id is None or tok.eos_token_id is None:
        raise TokenizerError(f"LLaMA tokenizer in {p} lacks a bos or eos token")
    if instruction_specials:
        _apply_instruction_specials(tok)
    return tok


def _apply_instruction_specials(tok) -> None:
    from tokenizers import processors

    eos = "</s>"
    tok.add_special_tokens({"pad_token": "[PAD]", "bos_token": eos, "eos_token": eos, "unk_token": eos})
    eos_id = tok.convert_tokens_to_ids(eos)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{eos} $A", pair=f"{eos} $A {eos} $B", special_tokens=[(eos, eos_id)])


def _is_wordpiece_json(path: Path) -> bool:
    """True when ``path`` is a tokenizers JSON file whose model is WordPiece (BERT)."""
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model", {}).get("type") == "WordPiece"
    except (OSError, ValueError):
        return False


def load_qformer_tokenizer(folder_or_path: str | Path, truncation_side: str = "left"):
    """The Q-Former's BERT tokenizer with ``[DEC]`` as bos (added when the folder lacks it).

    ``folder_or_path``: a checkpoint folder (its ``qformer_tokenizer/`` is used), a BERT tokenizer
    folder, or a ``vocab.txt`` file.
    """
    from transformers import BertTokenizer

    p = Path(folder_or_path)
    if p.is_dir() and (p / "qformer_tokenizer").is_dir():
        p = p / "qformer_tokenizer"
    try:
        if p.is_file():
            tok = BertTokenizer(vocab=str(p), do_lower_case=True, truncation_side=truncation_side)
        else:
            p = _folder(p, "Q-Former")
            if not ((p / "vocab.txt").is_file() or _is_wordpiece_json(p / "tokenizer.json")):
                hint = (" (it holds a LLaMA tokenizer: a release checkpoint ships no BERT vocabulary,"
                        " pass the bert-base-uncased tokenizer folder or its vocab.txt)"
                        if (p / "tokenizer.json").is_file() or (p / "tokenizer.model").is_file() else "")
                raise TokenizerError(f"no Q-Former (BERT WordPiece) tokenizer in {p}: expected "
                                     f"vocab.txt, a WordPiece tokenizer.json or a qformer_tokenizer/ "
                                     f"folder{hint}")
            tok = BertTokenizer.from_pretrained(str(p), truncation_side=truncation_side,
                                                local_files_only=True)
    except TokenizerError:
        raise
    except Exception as e:
        raise TokenizerError(f"cannot load the Q-Former tokenizer at {p}: {type(e).__name__}: {e}") from e
    if tok.bos_token != QFORMER_BOS:
        tok.add_special_tokens({"bos_token": QFORMER_BOS})
    tok.truncation_side = truncation_side
    return tok


def fallback_byte(tok) -> int | None:
    """The byte of a SentencePiece byte-fallback token "<0xNN>", else None."""
    if isinstance(tok, str) and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
        return int(tok[3:5], 16)
    return None


class ByteTokenIds:
    """Which token ids are byte-fallback pieces (looked up once per id), for a transformers
    tokenizer or a raw ``tokenizers.Tokenizer``. The decoder joins a run of them, and a later
    byte can turn the whole run into U+FFFD, so text decoded from a trailing run may still change."""

    def __init__(self, tokenizer) -> None:
        self._piece = getattr(tokenizer, "convert_ids_to_tokens", None) or tokenizer.id_to_token
        self._known: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        b = self._known.get(token_id)
        if b is None:
            b = self._known[token_id] = fallback_byte(self._piece(int(token_id))) is not None
        return b

    def stable_prefix(self, ids: list[int]) -> int:
        """How many of ``ids`` come before their trailing run of byte tokens."""
        n = len(ids)
        while n and self(ids[n - 1]):
            n -= 1
        return n


def piece_text(tok) -> tuple[str, list[int]]:
    """(text, UTF-8 bytes) of one vocabulary piece as it reads inside a text: SentencePiece's "▁"
    is a space, a byte-fallback piece "<0xNN>" is that byte (its text "" unless ASCII); not a
    string (None): nothing."""
    if not isinstance(tok, str):
        return "", []
    b = fallback_byte(tok)
    if b is not None:
        return (chr(b) if b < 0x80 else ""), [b]
    text = tok.replace("\u2581", " ")
    return text, list(text.encode("utf-8"))
