"""Tokenizer: a byte-level BPE (HF `tokenizers`) plus the control tokens the MM1 recipe needs.

We train our own BPE for the synthetic world (`mm1 data tokenizer`) or load any HF
`tokenizer.json` (e.g. SmolLM2's, from the folder of `model.decoder.init`). Either way the control
tokens below are present, added as special tokens if missing: `<image>` marks one image-token slot,
and mm1's chat template delimits turns. `encode` treats its input as *text*: a literal `<image>` or
`<|endoftext|>` in a web page or a chat message becomes ordinary text tokens, never a control
token. Control tokens enter a sequence only through `control_id` and `encode_markup`, which the
templates in `mm1.data.template` call.

An Instruct model's folder also holds its chat template (`chat_template.jinja`, or the
`chat_template` of `tokenizer_config.json`): it is kept as `chat_template` and saved beside the
tokenizer, so every run, export and server uses the template the model was tuned with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from mm1.data.errors import RecordError

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

    def __init__(self, hf: HFTokenizer, *, chat_template: ChatTemplateSource | None = None) -> None:
        missing = [t for t in SPECIALS if hf.token_to_id(t) is None]
        if missing:
            hf.add_special_tokens(missing)
        self.hf = hf
        self.chat_template = chat_template  # an HF Instruct model's Jinja template; None: mm1's own
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
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
            from mm1.files import FileFormatError

            raise FileFormatError(f"{path}: not a readable tokenizer.json (truncated? {err})") from None
        return cls(hf, chat_template=read_chat_template(path.parent))

    def __len__(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A hash of the whole tokenizer (vocabulary, merges, added tokens, chat template): prepared data
        records it."""
        chat = json.dumps(dataclasses.asdict(self.chat_template)) if self.chat_template else ""
        return hashlib.sha256((self.hf.to_str() + chat).encode()).hexdigest()[:16]

    def special_tokens(self) -> list[str]:
        """Every added special token's string (a template's markup may hold any of them)."""
        return [t.content for t in self.hf.get_added_tokens_decoder().values() if t.special]

    def control_id(self, token: str) -> int:
        i = self.hf.token_to_id(token)
        if i is None:
            raise KeyError(f"{token} is not a token of this tokenizer")
        return i

    def encode(self, text: str) -> list[int]:
        """Text → ids; control-token look-alikes in `text` stay text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_markup(self, text: str) -> list[int]:
        """A chat template's own text → ids, its special tokens (`<|im_start|>`) as special tokens."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids if int(i) != self.image_id], skip_special_tokens=True)

    def save(self, path: str | Path) -> None:
        """`path` (a tokenizer.json) and, for an Instruct model's template, `chat_template.jinja` beside it."""
        from mm1.files import atomic_path

        with atomic_path(Path(path)) as tmp:
            self.hf.save(str(tmp))
        if self.chat_template:
            write_chat_template(self.chat_template, path.parent)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatTemplateSource:
    """An HF model's chat template as its folder gives it: the Jinja source and the BOS/EOS strings
    that templates may use (`{{ bos_token }}`)."""

    template: str
    bos_token: str = ""
    eos_token: str = ""


def _token_string(value: object) -> str:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else ""


def read_chat_template(folder: Path) -> ChatTemplateSource | None:
    """The chat template a model folder ships: `chat_template.jinja` (transformers 4.43+), else the
    `chat_template` of `tokenizer_config.json` (a string, or a list of named ones: 'default'); None if
    it has none. BOS/EOS come from `tokenizer_config.json`."""
    config_path = folder / "tokenizer_config.json"
    config: dict = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as err:
            raise RecordError(str(config_path), "not valid JSON", str(err)) from None
        if not isinstance(config, dict):
            raise RecordError(str(config_path), "not a JSON object")
    found = config.get("chat_template")
    if (folder / CHAT_TEMPLATE_FILE).exists():
        found = (folder / CHAT_TEMPLATE_FILE).read_text()
    if isinstance(found, list):
        found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None)
    if not (isinstance(found, str) and found.strip()):
        return None
    return ChatTemplateSource(found, _token_string(config.get("bos_token")), _token_string(config.get("eos_token")))


def write_chat_template(source: ChatTemplateSource, folder: Path) -> None:
    """`chat_template.jinja` and a `tokenizer_config.json` naming BOS/EOS, as transformers writes them."""
    (folder / CHAT_TEMPLATE_FILE).write_text(source.template)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": source.bos_token or None, "eos_token": source.eos_token or None}, indent=2) + "\n")


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
