"""Text tokenizer: BERT uncased WordPiece, loaded from a directory / hub name, or trained offline on captions.

``TextTokenizer`` wraps a ``tokenizers.Tokenizer`` (fast, picklable into dataloader workers, no transformers
import). ``train_wordpiece`` trains a vocabulary with BERT's uncased normaliser and pre-tokenizer and the special
tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (``[PAD]`` first, so its id is 0 = the model's ``pad_token_id``) and saves
a directory that ``transformers.BertTokenizerFast.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

import torch

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TokenizerError(ValueError):
    pass


class TextTokenizer:
    """Pads/truncates to a fixed length so every batch has the same shape (static shapes, no recompiles)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks special token(s) {missing}; a BERT WordPiece vocabulary is needed")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[t] for t in SPECIAL_TOKENS)
        self.special_ids = tuple(ids.values())
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``texts`` -> ``(input_ids [B, max_length] int64, attention_mask [B, max_length] int64)``."""
        tok = self.tok
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        enc = tok.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask

    def decode(self, ids) -> str:
        return self.tok.decode(list(map(int, ids)), skip_special_tokens=True)


def load_tokenizer(name_or_dir: str | os.PathLike) -> TextTokenizer:
    """A directory holding ``tokenizer.json`` (fast path) or ``vocab.txt``, or a hub name (from the local cache;
    transformers resolves it, honouring ``HF_HUB_OFFLINE``)."""
    from tokenizers import Tokenizer

    p = Path(name_or_dir)
    if (p / "tokenizer.json").is_file():
        return TextTokenizer(Tokenizer.from_file(str(p / "tokenizer.json")))
    if p.is_file() and p.name == "tokenizer.json":
        return TextTokenizer(Tokenizer.from_file(str(p)))
    try:
        from transformers import BertTokenizerFast

        hf = BertTokenizerFast.from_pretrained(str(name_or_dir))
    except Exception as e:  # noqa: BLE001 - the cause is in the message; callers want one error type
        raise TokenizerError(
            f"cannot load tokenizer {str(name_or_dir)!r}: {e}. Offline, train one with `flava tokenizer train` "
            "or leave data.tokenizer unset to train it from the captions."
        ) from None
    return TextTokenizer(hf.backend_tokenizer)


def _bert_tokenizer(vocab: dict[str, int] | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if vocab:
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok, processors


def train_wordpiece(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 30522, min_frequency: int = 1
) -> TextTokenizer:
    """Train a BERT-uncased WordPiece vocabulary on ``texts`` and save it to ``out_dir`` (BertTokenizerFast
    format). The vocabulary can come out smaller than ``vocab_size`` on a small corpus."""
    from tokenizers import trainers

    tok, processors = _bert_tokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##",
    )  # fmt: skip
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    # The trainer breaks frequency ties in hash-map order, so ids differ from one training to the next. WordPiece
    # tokenizes by greedy longest match, independent of ids: renumber (special tokens first, then sorted) so that
    # the same corpus always gives the same ids.
    trained = tok.get_vocab()
    ordered = list(SPECIAL_TOKENS) + sorted(t for t in trained if t not in SPECIAL_TOKENS)
    tok, processors = _bert_tokenizer({t: i for i, t in enumerate(ordered)})
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    save_tokenizer_dir(tok, out_dir)
    return TextTokenizer(tok)


def save_tokenizer_dir(tok, out_dir: str | os.PathLike, model_max_length: int = 512) -> None:
    """Write tokenizer.json, vocab.txt and the transformers config files (without importing transformers);
    written to a temporary directory and renamed, so a reader never sees half a tokenizer."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp / "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    with open(tmp / "vocab.txt", "w", encoding="utf-8") as f:
        for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(token + "\n")
    specials = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (tmp / "tokenizer_config.json").write_text(
        json.dumps(
            dict(tokenizer_class="BertTokenizerFast", do_lower_case=True, tokenize_chinese_chars=True,
                 strip_accents=None, model_max_length=model_max_length, **specials),
            indent=2,
        )  # fmt: skip
    )
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)


def copy_tokenizer(tok: TextTokenizer, out_dir: str | os.PathLike) -> None:
    save_tokenizer_dir(tok.tok, out_dir)
