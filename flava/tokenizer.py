"""Text tokenizer: BERT uncased WordPiece, loaded from a directory / hub name, or trained offline on captions.

``TextTokenizer`` wraps a ``tokenizers.Tokenizer`` (fast, picklable into dataloader workers, no transformers
import). ``train_wordpiece`` trains a vocabulary with BERT's uncased normaliser and pre-tokenizer and the special
tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` (``[PAD]`` first, so its id is 0 = the model's ``pad_token_id``) and saves
a directory that ``transformers.BertTokenizerFast.from_pretrained`` loads.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import torch

from pmd.atomic import atomic_directory

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


def count_words(texts: Iterable[str]) -> Counter:
    """Word frequencies after BERT's uncased normaliser and pre-tokenizer (the units WordPiece splits)."""
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter = Counter()
    for t in texts:
        if t:
            counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(t)))
    return counts


def learn_wordpiece_vocab(
    word_counts: dict[str, int], vocab_size: int, min_frequency: int = 1, prefix: str = "##"
) -> list[str]:
    """The WordPiece vocabulary of ``tokenizers.trainers.WordPieceTrainer`` (BPE merges over words, continuation
    pieces marked with ``prefix``), with every tie broken by the tokens' text: the result is a pure function of
    the word counts. (The Rust trainer breaks ties in hash-map order, so two trainings on the same corpus differ.)

    Returns the tokens in id order: special tokens, the alphabet, the continuation alphabet, then one token per
    merge in the order learned."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    index = {t: i for i, t in enumerate(vocab)}

    def add(token: str) -> int:
        if token not in index:
            index[token] = len(vocab)
            vocab.append(token)
        return index[token]

    words = sorted(word_counts)
    for c in sorted({c for w in words for c in w}):  # like the Rust trainer: every character, unprefixed
        add(c)
    for c in sorted({c for w in words for c in w[1:]}):
        add(prefix + c)
    syms = [[index[w[0]]] + [index[prefix + c] for c in w[1:]] for w in words]
    counts = [int(word_counts[w]) for w in words]

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, s in enumerate(syms):
        for pair in zip(s, s[1:]):
            pair_count[pair] += counts[wi]
            where[pair].add(wi)
    # max-heap on (count, then smallest text first); entries go stale when counts change and are re-checked on pop
    heap = [(-c, vocab[a], vocab[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)
    plen = len(prefix)
    while len(vocab) < vocab_size and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        c = pair_count.get((a, b), 0)
        if c != -neg:
            if c > 0:
                heapq.heappush(heap, (-c, vocab[a], vocab[b], a, b))
            continue
        if c < min_frequency:
            break
        tb = vocab[b]
        new = add(vocab[a] + (tb[plen:] if tb.startswith(prefix) else tb))
        changed: set[tuple[int, int]] = set()
        for wi in where.pop((a, b), ()):
            s, n = syms[wi], counts[wi]
            if len(s) < 2:
                continue
            for pair in zip(s, s[1:]):
                pair_count[pair] -= n
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    merged.append(new)
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            syms[wi] = merged
            for pair in zip(merged, merged[1:]):
                pair_count[pair] += n
                where[pair].add(wi)
                changed.add(pair)
        pair_count.pop((a, b), None)
        for pair in sorted(changed):
            cnt = pair_count[pair]
            if cnt > 0:
                heapq.heappush(heap, (-cnt, vocab[pair[0]], vocab[pair[1]], pair[0], pair[1]))
    return vocab


def train_wordpiece(
    texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 30522, min_frequency: int = 1
) -> TextTokenizer:
    """Train a BERT-uncased WordPiece vocabulary on ``texts`` and save it to ``out_dir`` (BertTokenizerFast
    format). Deterministic: the same texts give byte-identical files in any process (``learn_wordpiece_vocab``).
    The vocabulary can come out smaller than ``vocab_size`` on a small corpus."""
    counts = count_words(texts)
    if not counts:
        raise TokenizerError("no text to train a tokenizer on")
    vocab = learn_wordpiece_vocab(counts, vocab_size, min_frequency)
    log.info("WordPiece vocabulary: %d tokens from %d distinct words", len(vocab), len(counts))
    tok, processors = _bert_tokenizer({t: i for i, t in enumerate(vocab)})
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # already in the vocabulary: marks them special (decode skips them)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    save_tokenizer_dir(tok, out_dir)
    return TextTokenizer(tok)


def save_tokenizer_dir(tok, out_dir: str | os.PathLike, model_max_length: int = 512) -> None:
    """Write tokenizer.json, vocab.txt and the transformers config files (without importing transformers);
    written to a temporary directory and renamed, so a reader never sees half a tokenizer."""
    with atomic_directory(out_dir) as tmp:
        _write_tokenizer_files(tok, tmp, model_max_length)


def _write_tokenizer_files(tok, tmp: Path, model_max_length: int) -> None:
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
        )
    )


def copy_tokenizer(tok: TextTokenizer, out_dir: str | os.PathLike) -> None:
    save_tokenizer_dir(tok.tok, out_dir)
