"""Tokenizer: a byte-level BPE (HF `tokenizers`) plus the control tokens the MM1 recipe needs.

We train our own BPE for the synthetic world (`mm1 data tokenizer`) or load any HF
`tokenizer.json` (e.g. SmolLM2's). Either way the control tokens below are present, added as
special tokens if missing: `<image>` marks one image-token slot, and the chat template delimits
turns. `encode` treats its input as *text*: a literal `<image>` or `<|endoftext|>` in a web page
or a chat message becomes ordinary text tokens, never a control token. Control tokens enter a
sequence only through `control_id`, which the templates in `mm1.data.template` call.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD = "<|pad|>"
EOS = "<|endoftext|>"
IMAGE = "<image>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
SYSTEM = "<|system|>"
SPECIALS = [PAD, EOS, IMAGE, USER, ASSISTANT, END, SYSTEM]  # ids 0..6 in tokenizers we train


def _text_only(hf: HFTokenizer) -> HFTokenizer:
    """A copy of `hf` that encodes every added token's string as plain text."""
    spec = json.loads(hf.to_str())
    for tok in spec.get("added_tokens", []):
        tok["special"] = True  # only special tokens obey `encode_special_tokens`
    plain = HFTokenizer.from_str(json.dumps(spec))
    plain.encode_special_tokens = True
    return plain


class Tokenizer:
    """Our control tokens' ids, text encoding that never yields a control token, and decoding."""

    def __init__(self, hf: HFTokenizer) -> None:
        missing = [t for t in SPECIALS if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.hf = hf
        self._plain = _text_only(hf)
        self.pad_id, self.eos_id, self.image_id, self.user_id, self.assistant_id, self.end_id, self.system_id = (
            hf.token_to_id(t) for t in SPECIALS
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer at {path}; train one with `mm1 data tokenizer`")
        return cls(HFTokenizer.from_file(str(path)))

    def __len__(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocabulary, merges, added tokens): prepared data records it."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def control_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise KeyError(f"{token} is not a token of this tokenizer")
        return i

    def encode(self, text: str) -> list[int]:
        """Text → ids; control-token look-alikes in `text` stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids if int(i) != self.image_id], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf.train_from_iterator(texts, trainer)
    return Tokenizer(hf)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int, out: Path) -> Path:
    train_bpe(texts, vocab_size=vocab_size).save(out)
    return out
