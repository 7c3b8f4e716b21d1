"""How records and conversations become segments: raw text, control tokens and images, in order.

This is the one place where control tokens enter a sequence. Text from data or from a user is
always a `Text` segment, encoded as text even when it looks like a control token (`<image>` in a
web page, `<|user|>` in a chat message); only the templates below emit `Control` segments.

One chat template serves SFT data, evaluation in chat format, `mm1 chat` and `mm1 serve` alike: the
tokenizer's (`Tokenizer.template`). mm1's own is

    [<|system|>system<|end|>] <|user|>images…text<|end|><|assistant|>answer<|end|> …

and a model imported from an Instruct folder keeps the Jinja template its folder ships
(`HFChatTemplate`, e.g. SmolLM2's `<|im_start|>user\n…<|im_end|>`), whose own text is `Markup`:
encoded with its special tokens, while the messages inside it stay `Text`.

One rule places images: images that nothing else places go at the start of their user turn
(LLaVA records without `<image>` markers: the first user turn; a chat message: its own turn).
The loss falls on assistant answers and the markup that closes them (`<|end|>`, `<|im_end|>`),
never on system or user turns.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from PIL import Image

from mm1.data.records import (
    CaptionRecord,
    ConversationRecord,
    DocumentRecord,
    ImageRef,
    Record,
    Role,
    TextRecord,
    Turn,
)
from mm1.data.tokenizer import ASSISTANT, END, SYSTEM, USER, ChatTemplateSource, Tokenizer


@dataclass(frozen=True)
class Text:
    """Raw text: encoded as text, never as a control token. `loss`: its tokens are predicted."""

    text: str
    loss: bool = False


@dataclass(frozen=True)
class Control:
    """One control (special) token, by its string, e.g. `<|user|>`."""

    token: str
    loss: bool = False


@dataclass(frozen=True)
class Markup:
    """A chat template's own text (`<|im_start|>user\n`): encoded with its special tokens."""

    text: str
    loss: bool = False


# The task prompts of chat-format evaluation, as LLaVA-1.5 words them (the synthetic world's SFT
# conversations use them too, as LLaVA's SFT mix does).
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER = "Answer the question using a single word or phrase."

ImageLike = ImageRef | Image.Image
Segment = Text | Control | Markup | ImageRef | Image.Image


def user_turn(text: str, images: Sequence[ImageLike] = ()) -> Turn:
    """A user turn with its images first (the one placement rule)."""
    return Turn(Role.USER, (*images, text))


class ChatTemplate:
    """mm1's own chat template (the Instruct template of an imported model replaces it: `HFChatTemplate`)."""

    name = "mm1-2"  # part of prepared data's identity: bumped when the rendering changes (2: reply_prefix)
    stop_tokens: tuple[str, ...] = (END,)  # what ends an assistant turn
    # The assistant's reply starts after a space (as Llama-2's `[/INST] ` does), so that its first word is
    # the token it is in running text (" red"), which pre-training taught, not the space-less token
    # ("red") that a byte-level BPE gives a word at the start of a string and that a decoder trained
    # from scratch has barely seen: without it, the tiny recipe's SFT answered one word to every question.
    reply_prefix = " "

    def render(self, turns: Sequence[Turn], *, generation_prompt: bool = False) -> list[Segment]:
        """Segments of a conversation; `generation_prompt` ends with the assistant's opening."""
        out: list[Segment] = []
        for turn in turns:
            if turn.role == Role.ASSISTANT:
                out.append(Control(ASSISTANT))
                texts = [p for p in turn.parts if isinstance(p, str)]
                out += [Text(self.reply_prefix + p.lstrip(" ") if i == 0 else p, loss=True)
                        for i, p in enumerate(texts)]
                out.append(Control(END, loss=True))
                continue
            out.append(Control(SYSTEM if turn.role == Role.SYSTEM else USER))
            out += [Text(p) if isinstance(p, str) else p for p in turn.parts]
            out.append(Control(END))
        if generation_prompt:
            out.append(Control(ASSISTANT))
        return out


_SENTINEL = "\x00mm1-message-{}\x00"
_SENTINEL_RE = re.compile("\x00mm1-message-(\\d+)\x00")


class HFChatTemplate(ChatTemplate):
    """The Jinja chat template of a Hugging Face Instruct model, rendered as segments.

    Each message is rendered as a sentinel that is replaced afterwards by its own segments (images
    and `Text`), so that a message's words can never be read as the template's special tokens; what
    the template writes around them is `Markup`. The markup that closes an assistant message (found
    once by rendering a two-message conversation: SmolLM2's `<|im_end|>\n`) carries the loss with it,
    and the special tokens in it are the stop tokens of generation.
    """

    def __init__(self, source: str, *, special_tokens: Sequence[str], bos: str = "", eos: str = "") -> None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals |= {"raise_exception": raise_exception, "strftime_now": lambda f: datetime.now().strftime(f)}
        self.source = source
        self.reply_prefix = ""  # the template's own markup separates the reply
        self.name = "hf-" + hashlib.sha256(source.encode()).hexdigest()[:12]
        self._jinja = env.from_string(source)
        self._bos, self._eos = bos, eos
        closing = self._text([{"role": "user", "content": _SENTINEL.format(0)},
                              {"role": "assistant", "content": _SENTINEL.format(1)}], False)
        self.closing = closing.split(_SENTINEL.format(1), 1)[1].rstrip()
        self.stop_tokens = tuple(t for t in special_tokens if t and t in self.closing) or ((eos,) if eos else ())

    def _text(self, messages: list[dict], generation_prompt: bool) -> str:
        return self._jinja.render(messages=messages, add_generation_prompt=generation_prompt,
                                  bos_token=self._bos, eos_token=self._eos)

    def render(self, turns: Sequence[Turn], *, generation_prompt: bool = False) -> list[Segment]:
        messages = [{"role": t.role.value, "content": _SENTINEL.format(i)} for i, t in enumerate(turns)]
        pieces = _SENTINEL_RE.split(self._text(messages, generation_prompt))
        out: list[Segment] = []
        after_answer = False
        for k, piece in enumerate(pieces):
            if k % 2 == 1:  # a message, by its index
                turn = turns[int(piece)]
                answer = turn.role == Role.ASSISTANT
                out += [Text(p, loss=answer) if isinstance(p, str) else p for p in turn.parts]
                after_answer = answer
                continue
            if after_answer and self.closing and piece.startswith(self.closing):
                out.append(Markup(self.closing, loss=True))
                piece = piece[len(self.closing):]
            if piece:
                out.append(Markup(piece))
            after_answer = False
        return out


def stop_token_ids(tok: Tokenizer) -> list[int]:
    """What ends generation: the end of text, and what ends an assistant turn in the model's chat template."""
    return sorted({tok.eos_id, *(tok.control_id(t) for t in template_for(tok).stop_tokens)})


def template_for(tok: Tokenizer) -> ChatTemplate:
    """The chat template of a tokenizer's model: its Instruct template if it ships one, else mm1's."""
    if tok.chat_template is None:
        return ChatTemplate()
    return _hf_template(tok.chat_template, tuple(tok.special_tokens()))


@functools.lru_cache(maxsize=8)
def _hf_template(source: ChatTemplateSource, special_tokens: tuple[str, ...]) -> HFChatTemplate:
    return HFChatTemplate(source.template, special_tokens=special_tokens, bos=source.bos_token, eos=source.eos_token)


def render_record(record: Record, template: ChatTemplate, *, chat: bool = False) -> list[Segment]:
    """The segments of one training record (the end-of-text token is added by the tokenizer step).

    `chat` (SFT): a caption pair becomes a captioning conversation with LLaVA-1.5's prompt, as caption
    sets enter LLaVA's instruction mix (TextCaps), so caption data can join an SFT mixture.
    """
    if isinstance(record, CaptionRecord):
        if chat:
            return template.render([user_turn(CAPTION_PROMPT, [record.image]), Turn(Role.ASSISTANT, (record.caption,))])
        return [record.image, Text(record.caption, loss=True)]
    if isinstance(record, DocumentRecord):
        return [Text(p, loss=True) if isinstance(p, str) else p for p in record.parts]
    if isinstance(record, TextRecord):
        return [Text(record.text, loss=True)]
    if isinstance(record, ConversationRecord):
        return template.render(record.turns)
    raise TypeError(f"not a record: {type(record).__name__}")
