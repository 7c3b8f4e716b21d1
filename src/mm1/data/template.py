"""How records and conversations become segments: raw text, control tokens and images, in order.

This is the one place where control tokens enter a sequence. Text from data or from a user is
always a `Text` segment, encoded as text even when it looks like a control token (`<image>` in a
web page, `<|user|>` in a chat message); only the templates below emit `Control` segments.

The chat template is used by SFT data, evaluation in chat format and `mm1 chat` alike:

    [<|system|>system<|end|>] <|user|>images…text<|end|><|assistant|>answer<|end|> …

One rule places images: images that nothing else places go at the start of their user turn
(LLaVA records without `<image>` markers: the first user turn; a chat message: its own turn).
The loss falls on assistant answers and their `<|end|>`, never on system or user turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from mm1.data.tokenizer import ASSISTANT, END, SYSTEM, USER


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


# The task prompts of chat-format evaluation, as LLaVA-1.5 words them (the synthetic world's SFT
# conversations use them too, as LLaVA's SFT mix does).
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
SHORT_ANSWER = "Answer the question using a single word or phrase."

ImageLike = ImageRef | Image.Image
Segment = Text | Control | ImageRef | Image.Image


def user_turn(text: str, images: Sequence[ImageLike] = ()) -> Turn:
    """A user turn with its images first (the one placement rule)."""
    return Turn(Role.USER, (*images, text))


class ChatTemplate:
    """mm1's own chat template (the Instruct template of an imported model can replace it)."""

    name = "mm1"

    def render(self, turns: Sequence[Turn], *, generation_prompt: bool = False) -> list[Segment]:
        """Segments of a conversation; `generation_prompt` ends with the assistant's opening."""
        out: list[Segment] = []
        for turn in turns:
            if turn.role == Role.ASSISTANT:
                out.append(Control(ASSISTANT))
                out += [Text(p, loss=True) for p in turn.parts if isinstance(p, str)]
                out.append(Control(END, loss=True))
                continue
            out.append(Control(SYSTEM if turn.role == Role.SYSTEM else USER))
            out += [Text(p) if isinstance(p, str) else p for p in turn.parts]
            out.append(Control(END))
        if generation_prompt:
            out.append(Control(ASSISTANT))
        return out


def render_record(record: Record, template: ChatTemplate) -> list[Segment]:
    """The segments of one training record (the end-of-text token is added by the tokenizer step)."""
    if isinstance(record, CaptionRecord):
        return [record.image, Text(record.caption, loss=True)]
    if isinstance(record, DocumentRecord):
        return [Text(p, loss=True) if isinstance(p, str) else p for p in record.parts]
    if isinstance(record, TextRecord):
        return [Text(record.text, loss=True)]
    if isinstance(record, ConversationRecord):
        return template.render(record.turns)
    raise TypeError(f"not a record: {type(record).__name__}")
