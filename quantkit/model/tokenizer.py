"""Llama 2's sentencepiece tokenizer: BOS by default, optional EOS, left padding, the chat format."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import sentencepiece as spm
import torch

from quantkit.errors import QuantkitError

# Llama-2-chat's prompt format, from Meta's reference code (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        model_file = Path(model_file)
        if model_file.is_dir():
            model_file = model_file / "tokenizer.model"
        if not model_file.is_file():
            raise QuantkitError(f"{model_file}: no tokenizer.model: copy Llama 2's sentencepiece tokenizer.model "
                                f"into the model directory")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as e:
            raise QuantkitError(f"{model_file}: not a sentencepiece model ({e}): restore tokenizer.model") from None
        self.path = model_file
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # Llama 2 has no pad token (pad_id = -1). Batches pad with <unk> (0) and always mask it out.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.sp.unk_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def fingerprint(self) -> str:
        """Hash of the sentencepiece model: equal fingerprints tokenize identically."""
        return hashlib.blake2b(self.sp.serialized_model_proto(), digest_size=16).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.Encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of the ids; BOS/EOS/pad vanish and the dummy-prefix space is not emitted."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.sp.Decode([int(i) for i in ids])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False):
        """Left-padded ids (B, T) and attention mask (B, T), 1 for real tokens."""
        return pad_left([self.encode(t, bos, eos) for t in texts], self.pad_id)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Llama-2-chat dialog -> ids, ending with an open [INST] ... [/INST] for the model to answer.

        messages: [{"role": "system"?}, {"role": "user"}, {"role": "assistant"}, ..., {"role": "user"}].
        """
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2:
                raise QuantkitError("chat: a system message must be followed by a user message")
            system, first = messages[0], messages[1]
            merged = {"role": "user", "content": B_SYS + system["content"] + E_SYS + first["content"]}
            messages = [merged] + messages[2:]
        roles = [m["role"] for m in messages]
        if not messages or roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]) \
                or roles[-1] != "user":
            raise QuantkitError(f"chat: roles must alternate user/assistant and end with user, got {roles}")
        ids: list[int] = []
        for prompt, answer in zip(messages[:-1:2], messages[1::2]):
            ids += self.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                               bos=True, eos=True)
        return ids + self.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True)


def pad_left(seqs: list[list[int]], pad_id: int):
    """Left-pad id lists to one length: ids (B, T) LongTensor and attention mask (B, T)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise QuantkitError("cannot batch an empty prompt: every prompt needs at least one token")
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    return ids, mask


class TextStream:
    """Turns a growing list of token ids into text deltas, for printing tokens as they come.

    Decoding each token alone would drop the spaces sentencepiece encodes as '▁' and split UTF-8
    characters that byte fallback spreads over several tokens; decoding the whole sequence and
    emitting the new suffix does neither. A trailing U+FFFD (half a character) is held back.
    `prefix` (the prompt's ids) is decoded first but never emitted, so that the first new token
    keeps its leading space.
    """

    def __init__(self, tokenizer: Tokenizer, prefix: list[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prefix)
        self.emitted = tokenizer.decode(self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta
