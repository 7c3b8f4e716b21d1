"""Tokenizer: a byte-level BPE (HF `tokenizers`) plus the special tokens the MM1 recipe needs.

We train our own BPE for the synthetic world (`mm1 data tokenizer`) or load any HF
`tokenizer.json` (e.g. SmolLM2's). Either way the special tokens below are present, added if
missing: `<image>` marks one image-token slot, and the chat template delimits SFT turns.
"""

from __future__ import annotations

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
SPECIALS = [PAD, EOS, IMAGE, USER, ASSISTANT, END]  # ids 0..5 in tokenizers we train


class Tokenizer:
    """A thin wrapper that knows our special tokens' ids."""

    def __init__(self, hf: HFTokenizer) -> None:
        missing = [t for t in SPECIALS if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.hf = hf
        self.pad_id, self.eos_id, self.image_id, self.user_id, self.assistant_id, self.end_id = (
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

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids if int(i) != self.image_id], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))


def chat_turns(user: str, assistant: str | None = None) -> tuple[str, str]:
    """The chat template: (prompt part without loss, answer part with loss)."""
    prompt = f"{USER}{user}{END}{ASSISTANT}"
    return prompt, ("" if assistant is None else f"{assistant}{END}")


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


def train_tokenizer_on_world(root: Path, *, vocab_size: int, out: Path | None = None) -> Path:
    from mm1.data.sources import iter_world_texts  # sources reads LLaVA files, which use our tokens

    tok = train_bpe(iter_world_texts(root), vocab_size=vocab_size)
    path = out or root / "tokenizer.json"
    tok.save(path)
    return path
