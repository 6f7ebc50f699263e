"""Code Llama's prompt formats, built at the token-id level as Meta's reference does.

Meta's reference (`llama/generation.py`, `llama/tokenizer.py` in
meta-llama/codellama) encodes with SentencePiece directly: every `encode`
adds the implicit leading space ("dummy prefix"), `encode_infilling` does not,
and BOS/EOS are ids, never text. Hugging Face tokenizers differ from
SentencePiece on the implicit space (some skip it when the text already starts
with whitespace), so both encodings here are derived from one primitive that
has no implicit space at all, which every Llama tokenizer gets right.

This module knows nothing about HTTP: errors are `PromptError`s with the name
of the request field at fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")
INFILL_PIECES = {"prefix": "▁<PRE>", "suffix": "▁<SUF>", "middle": "▁<MID>", "eot": "▁<EOT>"}

# A character Llama vocabularies cannot merge with what follows (Meta uses the
# same one). Encoding SENTINEL + text and dropping SENTINEL's own tokens gives
# the text's tokens with no implicit leading space.
SENTINEL = "☺"

ROLE_ALIASES = {"developer": "system"}


class PromptError(ValueError):
    """A request whose messages or text cannot be turned into a prompt."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None

    def encode(self, text: str, **kwargs: Any) -> list[int]: ...
    def decode(self, token_ids: list[int], **kwargs: Any) -> str: ...
    def convert_tokens_to_ids(self, tokens: str) -> int: ...
    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class SpecialIds:
    bos: int
    eos: int
    prefix: int | None
    suffix: int | None
    middle: int | None
    eot: int | None

    @property
    def has_infill(self) -> bool:
        return None not in (self.prefix, self.suffix, self.middle, self.eot)


def special_ids(tokenizer: Tokenizer) -> SpecialIds:
    """Read BOS/EOS and the infill token ids from the tokenizer (never hard-coded)."""

    def piece_id(piece: str) -> int | None:
        tid = tokenizer.convert_tokens_to_ids(piece)
        return None if tid is None or tid == tokenizer.unk_token_id else int(tid)

    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no BOS/EOS token: not a Llama tokenizer")
    return SpecialIds(
        bos=int(tokenizer.bos_token_id),
        eos=int(tokenizer.eos_token_id),
        **{name: piece_id(piece) for name, piece in INFILL_PIECES.items()},
    )


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


class CodeLlamaPrompts:
    """Turns completion text, chat messages and infill requests into token ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.ids = special_ids(tokenizer)
        self._sentinel_ids = self._encode_plain(SENTINEL)
        probe = self._encode_plain(SENTINEL + "x")
        if probe[: len(self._sentinel_ids)] != self._sentinel_ids:
            raise ValueError(f"tokenizer merges {SENTINEL!r} with following text")

    def _encode_plain(self, text: str) -> list[int]:
        # split_special_tokens: text that spells "<s>" or "▁<PRE>" stays text,
        # as in SentencePiece; only ids placed here are control tokens.
        return self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_infilling(self, text: str) -> list[int]:
        """Tokens of `text` with no implicit leading space (Meta's `encode_infilling`)."""
        ids = self._encode_plain(SENTINEL + text)
        n = len(self._sentinel_ids)
        if ids[:n] != self._sentinel_ids:  # pragma: no cover - checked in __init__
            raise PromptError("text could not be tokenized", "prompt")
        return ids[n:]

    def encode(self, text: str) -> list[int]:
        """Tokens of `text` with SentencePiece's implicit leading space (Meta's `encode`)."""
        return self.encode_infilling(" " + text)

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, control tokens spelled out (as vLLM's /detokenize)."""
        return self._tokenizer.decode(token_ids)

    def pieces(self, token_ids: list[int]) -> list[str]:
        """The vocabulary entry of each id ("▁def", "<s>")."""
        return self._tokenizer.convert_ids_to_tokens(token_ids)

    # -- the three prompt formats

    def completion(self, text: str) -> list[int]:
        return [self.ids.bos, *self.encode(text)]

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The Instruct template, exactly as Meta's `chat_completion` builds it."""
        dialog = self._check_dialog(messages)
        if dialog[0].role == "system":
            first = ChatMessage(
                dialog[1].role, B_SYS + dialog[0].content + E_SYS + dialog[1].content
            )
            dialog = [first, *dialog[2:]]
        tokens: list[int] = []
        for user, answer in zip(dialog[0:-1:2], dialog[1::2], strict=True):
            text = f"{B_INST} {user.content.strip()} {E_INST} {answer.content.strip()} "
            tokens += [self.ids.bos, *self.encode(text), self.ids.eos]
        tokens += [self.ids.bos, *self.encode(f"{B_INST} {dialog[-1].content.strip()} {E_INST}")]
        return tokens

    def infill(self, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
        """Fill-in-the-middle, prefix-suffix-middle or suffix-prefix-middle."""
        bos, pre, suf, mid = self.ids.bos, self.ids.prefix, self.ids.suffix, self.ids.middle
        if pre is None or suf is None or mid is None:
            raise PromptError("this model's tokenizer has no infilling tokens", "suffix")
        if suffix_first:
            return [bos, pre, suf, *self.encode_infilling(suffix), mid, *self.encode(prefix)]
        return [bos, pre, *self.encode(prefix), suf, *self.encode_infilling(suffix), mid]

    @staticmethod
    def _check_dialog(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise PromptError("'messages' must hold at least one message", "messages")
        dialog = [ChatMessage(ROLE_ALIASES.get(m.role, m.role), m.content) for m in messages]
        for n, m in enumerate(dialog):
            if any(tag in m.content for tag in SPECIAL_TAGS):
                raise PromptError(
                    f"messages[{n}]: special tags ({', '.join(SPECIAL_TAGS)}) are not allowed "
                    "in message content (Meta's reference refuses them too)",
                    "messages",
                )
        start = 1 if dialog[0].role == "system" else 0
        if start and len(dialog) == 1:
            raise PromptError("a system message must be followed by a user message", "messages")
        for n, m in enumerate(dialog[start:], start=start):
            expected = "user" if (n - start) % 2 == 0 else "assistant"
            if m.role != expected:
                where = "first" if n == 0 else f"messages[{n}]"
                raise PromptError(
                    f"{where}: expected role '{expected}', got '{m.role}'. Code Llama Instruct "
                    "takes an optional 'system' message first, then 'user' and 'assistant' "
                    "alternating (u/a/u/a/u...), ending with 'user'",
                    "messages",
                )
        if dialog[-1].role != "user":
            raise PromptError(
                f"the last message must be from 'user', got '{dialog[-1].role}'", "messages"
            )
        return dialog


# ---------------------------------------------------------------- capabilities


@dataclass(frozen=True, slots=True)
class Capabilities:
    chat: bool
    infill: bool
    why_no_chat: str = ""
    why_no_infill: str = ""


# Code Llama 34B and 70B use hidden size 8192; only 7B (4096) and 13B (5120)
# were trained to infill.
_INFILL_HIDDEN_SIZES = {4096, 5120}


def capabilities(
    model_name: str, is_demo: bool, hidden_size: int, ids: SpecialIds, chat: str, infill: str
) -> Capabilities:
    """Which endpoints the checkpoint supports; `chat`/`infill` are 'auto', 'on' or 'off'."""
    name = model_name.lower()
    if chat == "auto":
        chat_on = is_demo or "instruct" in name
        why_chat = (
            ""
            if chat_on
            else (
                f"model '{model_name}' is not a Code Llama Instruct checkpoint: chat is for "
                "Instruct models; use /v1/completions (or start the server with --chat on)"
            )
        )
    else:
        chat_on = chat == "on"
        why_chat = "" if chat_on else "chat is disabled on this server (--chat off)"

    if not ids.has_infill:
        infill_on, why_infill = False, f"model '{model_name}' has no infilling tokens"
    elif infill == "auto":
        infill_on = is_demo or ("python" not in name and hidden_size in _INFILL_HIDDEN_SIZES)
        why_infill = (
            ""
            if infill_on
            else (
                f"model '{model_name}' does not support infilling (`suffix`): Code Llama infills "
                "with the 7B and 13B base and Instruct models only"
            )
        )
    else:
        infill_on = infill == "on"
        why_infill = "" if infill_on else "infilling is disabled on this server (--infill off)"
    return Capabilities(chat_on, infill_on, why_chat, why_infill)
