"""`mm1 chat` and `mm1 generate`: talking to a trained model from the terminal.

The conversation is rendered with the chat template (`mm1.data.template`), the same one SFT data
is rendered with; images attached to a message open its user turn. What the user types is text,
even when it looks like a control token. Inside the chat: `/image PATH` attaches an image to the
next message, `/reset` clears the history, `/quit` leaves. A missing or unreadable image is
reported in one line and the chat goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from mm1.data.errors import ImageError
from mm1.data.images import load_image
from mm1.data.records import Role, Turn
from mm1.data.template import ChatTemplate, template_for, user_turn
from mm1.serve.engine import Engine, GenerationConfig, Part

HELP = "commands: /image PATH (attach to the next message), /reset, /quit"


@dataclass
class Conversation:
    """A chat so far: its turns and the template that renders them into a prompt."""
    turns: list[Turn] = field(default_factory=list)
    template: ChatTemplate = field(default_factory=ChatTemplate)

    def prompt(self, images: list[Image.Image], user: str) -> list[Part]:
        return self.template.render([*self.turns, user_turn(user, images)], generation_prompt=True)

    def add(self, images: list[Image.Image], user: str, answer: str) -> None:
        self.turns += [user_turn(user, images), Turn(Role.ASSISTANT, (answer,))]


def respond(engine: Engine, conv: Conversation, images: list[Image.Image], user: str,
            gen: GenerationConfig) -> str:
    answer = engine.generate([conv.prompt(images, user)], gen)[0]
    conv.add(images, user, answer)
    return answer


def load_images(paths: list[str]) -> list[Image.Image]:
    """Load every path or raise ImageError naming the first that fails."""
    return [load_image(p) for p in paths]


def chat_loop(engine: Engine, gen: GenerationConfig, *, first_images: list[str] | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], None] = print) -> Conversation:
    conv = Conversation(template=template_for(engine.tok))
    pending: list[Image.Image] = []
    for path in first_images or []:
        pending += _attach(path, write)
    write(HELP)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return conv
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return conv
        if line == "/reset":
            conv, pending = Conversation(template=conv.template), []
            write("(history cleared)")
            continue
        if line.startswith("/image"):
            pending += _attach(line[len("/image"):].strip(), write)
            continue
        if line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}")
            continue
        write(f"mm1> {respond(engine, conv, pending, line, gen)}")
        pending = []


def _attach(path: str, write: Callable[[str], None]) -> list[Image.Image]:
    if not path:
        write("usage: /image PATH")
        return []
    try:
        img = load_image(path)
    except ImageError as err:
        write(f"cannot attach image: {err}")
        return []
    write(f"(attached {path})")
    return [img]


def generate_once(engine: Engine, *, prompt: str, images: list[str], gen: GenerationConfig, raw: bool) -> str:
    """One answer; `raw` feeds images then the prompt as they are, without the chat template."""
    imgs = load_images(images)
    if raw:
        return engine.generate([[*imgs, prompt]], gen)[0]
    return respond(engine, Conversation(template=template_for(engine.tok)), imgs, prompt, gen)
