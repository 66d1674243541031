"""ERNIE 4.5's chat format, shared by data preparation, post-training and serving.

    <|begin_of_sentence|>{system}\nUser: {user}\nAssistant: {answer}<|end_of_sentence|>User: ...

A generation prompt ends with "Assistant: " followed by an empty think block
(`<think>\n\n</think>\n\n`) when thinking is off (the default) or an open `<think>\n`
when it is on (ERNIE_FACTS §5); a past assistant turn is rendered the same way, its
reasoning (if any) inside the think block. `render_segments` marks which characters an assistant
wrote, so SFT can put the loss on assistant tokens only.

A user or system turn's content is a string, or a list of parts in OpenAI's shape:
`{"type": "text", "text": ...}` and `{"type": "image", "image": ref}` (ref: a path or URL the
caller resolves). An image renders inline as `IMAGE_MARK`, one placeholder between the start and
end markers; the caller that has the pixels widens the placeholder to the image's token count
(`image_refs` lists the images in rendering order).
"""

from __future__ import annotations

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END = "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"
VIDEO_PLACEHOLDER, VIDEO_START, VIDEO_END = "<|VIDEO_PLACEHOLDER|>", "<|VIDEO_START|>", "<|VIDEO_END|>"
VISION_TOKENS = (IMAGE_PLACEHOLDER, IMAGE_START, IMAGE_END, VIDEO_PLACEHOLDER, VIDEO_START, VIDEO_END)
"""In `ErnieConfig` order: image_token_id, image_start/end, video_token_id, video_start/end."""
SPECIAL_TOKENS = ("<pad>", BOS, EOS, THINK_OPEN, THINK_CLOSE, *VISION_TOKENS)
"""The bundled tokenizer puts these at ids 0, 1, 2, ... in this order (tiny presets rely on it)."""
ROLES = ("system", "user", "assistant")
IMAGE_MARK = IMAGE_START + IMAGE_PLACEHOLDER + IMAGE_END
"""One image in rendered text, before its placeholder is widened to the image's token count."""


def render_segments(
    messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = False
) -> list[tuple[str, bool]]:
    """(text, written_by_assistant) pieces whose concatenation is the rendered chat."""
    if not isinstance(messages, list | tuple):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} objects, got {type(messages).__name__}")
    pieces: list[tuple[str, bool]] = [(BOS, False)]
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be a {{'role', 'content'}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {ROLES}")
        if isinstance(content, list) and role != "assistant":
            content = "".join(_part_text(part, i, role) for part in content)
        if not isinstance(content, str):
            allowed = "a string" if role == "assistant" else "a string or a list of text / image parts"
            raise ValueError(f"message {i} ({role}) content must be {allowed}, got {type(content).__name__}")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message may only come first")
            pieces.append((content + "\n", False))
        elif role == "user":
            pieces.append((f"User: {content}\n", False))
        else:
            # The prompt part of an assistant turn is exactly the generation prompt of its mode,
            # so training targets and inference prompts agree token for token.
            reasoning = message.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ValueError(
                    f"message {i} (assistant) reasoning_content must be a string, got {type(reasoning).__name__}"
                )
            pieces.append((assistant_prompt(thinking=bool(reasoning)), False))
            answer = f"{reasoning}\n{THINK_CLOSE}\n{content}" if reasoning else content
            pieces.append((answer + EOS, True))
    if add_generation_prompt:
        pieces.append((assistant_prompt(enable_thinking), False))
    return pieces


def assistant_prompt(thinking: bool) -> str:
    """What precedes the assistant's own words: an open think block, or an empty one."""
    return f"Assistant: {THINK_OPEN}\n" if thinking else f"Assistant: {THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def render(messages: list[dict], add_generation_prompt: bool = False, enable_thinking: bool = False) -> str:
    return "".join(text for text, _ in render_segments(messages, add_generation_prompt, enable_thinking))


def image_refs(messages: list[dict]) -> list[str]:
    """The image parts' refs in the order `render` places them."""
    return [
        part["image"]
        for message in messages
        if isinstance(message, dict) and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image" and "image" in part
    ]


def _part_text(part, i: int, role: str) -> str:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
        return part["text"]
    if kind == "image" and isinstance(part.get("image"), str) and part["image"]:
        return IMAGE_MARK
    raise ValueError(
        f"message {i} ({role}) has a content part {part!r}; expected {{'type': 'text', 'text': str}} "
        "or {'type': 'image', 'image': ref}"
    )
