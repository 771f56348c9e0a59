"""Llama 2's sentencepiece tokenizer: BOS by default, optional EOS, left padding, the chat format.

Added tokens (a fine-tune's `<pad>` at id 32000) are read from the model directory as transformers 5
reads them: `tokenizer_config.json`'s `added_tokens_decoder` ({"id": {"content", "special", ...}}) or,
when it has none, the legacy `added_tokens.json` ({content: id}, special when the content is a named
special token: pad_token etc. in tokenizer_config.json or special_tokens_map.json). Like transformers,
tokens that are not sentencepiece pieces get the ids after the pieces in the order of their declared
ids (a declared id that is a piece's, or leaves a gap, is renumbered, with a warning), and named special
tokens no file lists are appended after them. Added tokens only decode: encoding stays sentencepiece's,
as Meta's reference tokenizes (typed "<pad>" is text, as typed "</s>" is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch

from quantkit.errors import QuantkitError
from quantkit.model.hub import resolve_model_dir

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "added_tokens.json", "generation_config.json")

# Llama-2-chat's prompt format, from Meta's reference code (llama/generation.py).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

ADDED_TOKENS_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE = \
    "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json"
# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (named special tokens missing from the files are appended so).
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
EXTRA_SPECIAL_TOKENS = ("extra_special_tokens", "additional_special_tokens")  # v5 name, then the v4 one

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AddedToken:
    content: str
    special: bool  # decode drops it, as transformers' skip_special_tokens does


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
        self.added, special_pieces = read_added_tokens(self.sp, model_file.parent)  # {id >= pieces: AddedToken}
        # Pieces decode drops: <s>, </s>, <unk> (= the pad), and pieces an added-tokens file marks special.
        self.dropped = special_pieces | {i for i in range(self.vocab_size)
                                         if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        self.warned_unknown = False  # ids beyond every token are warned about once per Tokenizer

    @property
    def vocab_size(self) -> int:
        """The sentencepiece pieces (transformers' `tokenizer.vocab_size`); added tokens come after them."""
        return self.sp.GetPieceSize()

    def __len__(self) -> int:
        """The full id range [0, len): pieces and added tokens, as transformers' `len(tokenizer)`."""
        return self.vocab_size + len(self.added)

    def check_ids(self, ids, vocab_size: int) -> None:
        """Refuse token ids (a list or tensor, one batch) the model has no embedding row for."""
        high = int(ids.max()) if isinstance(ids, torch.Tensor) and ids.numel() else max(ids, default=-1)
        if high >= vocab_size:
            raise QuantkitError(f"{self.path}: gives token id {high}, but the model's config.json has vocab_size "
                                f"{vocab_size} (this tokenizer has {len(self)} ids): use the tokenizer the model was "
                                f"trained with")

    def fingerprint(self) -> str:
        """Hash of the sentencepiece model: equal fingerprints tokenize identically."""
        return hashlib.blake2b(self.sp.serialized_model_proto(), digest_size=16).hexdigest()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.Encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Text of the ids as transformers' decode(ids, skip_special_tokens=True) gives it.

        BOS/EOS/pad and special added tokens vanish; other added tokens are their content; the dummy-prefix
        space is not emitted at the start, but a piece's space after an added token is. Ids no token has
        (a vocabulary padded beyond the tokenizer) decode as "", as in transformers' fast tokenizer.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        parts: list[str] = []
        run: list[int] = []  # sentencepiece ids since the last added token
        for i in map(int, ids):
            if 0 <= i < self.vocab_size:
                if i not in self.dropped:
                    run.append(i)
            elif i in self.added:
                if not self.added[i].special:
                    self._flush(run, parts)
                    parts.append(self.added[i].content)
            else:
                self._warn_unknown(i)
        self._flush(run, parts)
        return "".join(parts)

    def _flush(self, run: list[int], parts: list[str]) -> None:
        """Append the text of `run` (then empty it); only the text's start loses the '▁' of its first piece."""
        if not run:
            return
        space = " " if parts and self.sp.IdToPiece(run[0]).startswith("\u2581") else ""
        parts.append(space + self.sp.Decode(run))
        run.clear()

    def _warn_unknown(self, token_id: int) -> None:
        if not self.warned_unknown:
            log.warning("%s: token id %d is neither one of its %d pieces nor an added token: it decodes as \"\", "
                        "as in transformers (a model whose vocabulary is padded beyond its tokenizer's emits such ids)",
                        self.path, token_id, self.vocab_size)
            self.warned_unknown = True

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


# ---- added tokens ---------------------------------------------------------------------------------


def read_added_tokens(sp: spm.SentencePieceProcessor, directory: Path) -> tuple[dict[int, AddedToken], set[int]]:
    """({id: token} of the added tokens that are not pieces, the piece ids a file marks special), numbered as
    transformers numbers them: after the pieces, in the order of the declared ids, then the named specials."""
    declared, named, source = declared_added_tokens(directory)
    pieces = sp.GetPieceSize()
    added: dict[int, AddedToken] = {}
    special_pieces: set[int] = set()
    placed: set[str] = set()
    extra = [(None, AddedToken(content, True)) for content in named]  # appended when no file lists them
    for declared_id, token in sorted(declared, key=lambda entry: entry[0]) + extra:
        if token.content in placed:
            continue  # listed twice, or a named special a file already lists: the first one counts
        placed.add(token.content)
        piece = sp.PieceToId(token.content)
        if sp.IdToPiece(piece) == token.content:  # already a piece: it keeps the piece's id, as in transformers
            special_pieces |= {piece} if token.special else set()
            _warn_renumbered(source, token, declared_id, piece, f"the sentencepiece piece {piece}")
            continue
        new_id = pieces + len(added)
        _warn_renumbered(source, token, declared_id, new_id, f"id {new_id}, after the {pieces} pieces and the added "
                                                             f"tokens of lower ids")
        added[new_id] = token
    return added, special_pieces


def _warn_renumbered(source: Path, token: AddedToken, declared_id: int | None, actual: int, what: str) -> None:
    if declared_id is not None and declared_id != actual:
        log.warning("%s: added token %r declares id %d; transformers (and quantkit) decode it as %s", source,
                    token.content, declared_id, what)


def declared_added_tokens(directory: Path) -> tuple[list[tuple[int, AddedToken]], list[str], Path]:
    """([(declared id, token)], the named special tokens' contents, the file the tokens come from).

    transformers reads tokenizer_config.json's added_tokens_decoder when it has one, and only otherwise
    special_tokens_map.json (whose names override the config's) and added_tokens.json."""
    config_path = directory / TOKENIZER_CONFIG_FILE
    config = read_json_object(config_path) or {}
    named, extras = special_names(config, config_path)
    if "added_tokens_decoder" in config:
        specials = set(named.values()) | set(extras)
        return decoder_entries(config["added_tokens_decoder"], config_path, specials), \
            _ordered(named, extras), config_path
    map_path = directory / SPECIAL_TOKENS_FILE
    map_named, map_extras = special_names(read_json_object(map_path) or {}, map_path)
    named, extras = {**named, **map_named}, extras + [e for e in map_extras if e not in extras]
    added_path = directory / ADDED_TOKENS_FILE
    specials = set(named.values()) | set(extras)
    return added_file_entries(added_path, specials), _ordered(named, extras), added_path


def _ordered(named: dict[str, str], extras: list[str]) -> list[str]:
    return [named[key] for key in NAMED_SPECIAL_TOKENS if key in named] + extras


def read_json_object(path: Path) -> dict | None:
    """A JSON object file's contents; None when there is no such file."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantkitError(f"{path}: not valid JSON ({e}): fix the file or remove it") from None
    if not isinstance(obj, dict):
        raise QuantkitError(f"{path}: holds a JSON {type(obj).__name__}, not an object: fix the file or remove it")
    return obj


def special_names(obj: dict, path: Path) -> tuple[dict[str, str], list[str]]:
    """({'pad_token': '<pad>', ...}, [extra special tokens]) named in a tokenizer_config / special_tokens_map."""
    named = {key: content for key in NAMED_SPECIAL_TOKENS
             if (content := token_content(obj.get(key), path, key)) is not None}
    extras: list[str] = []
    for key in EXTRA_SPECIAL_TOKENS:
        value = obj.get(key) or []
        if not isinstance(value, (list, dict)):
            raise QuantkitError(f"{path}: {key} must be a list of tokens, got {type(value).__name__}: fix the file")
        values = value.values() if isinstance(value, dict) else value  # v5 also writes {name: token}
        extras += [c for v in values if (c := token_content(v, path, key)) is not None and c not in extras]
        if extras:
            break  # transformers reads additional_special_tokens only when there are no extra_special_tokens
    return named, extras


def token_content(value, path: Path, key: str) -> str | None:
    """The text of a token written as text or as {"content": text, ...}; None for null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise QuantkitError(f"{path}: {key} must be a token (text, or {{\"content\": text}}), got {str(value)[:60]}: "
                        f"fix the file")


def decoder_entries(decoder, path: Path, specials: set[str]) -> list[tuple[int, AddedToken]]:
    """tokenizer_config.json's added_tokens_decoder {"32000": {"content": "<pad>", "special": true, ...}}."""
    if not isinstance(decoder, dict):
        raise QuantkitError(f"{path}: added_tokens_decoder must map ids to tokens "
                            f"({{\"32000\": {{\"content\": \"<pad>\", \"special\": true}}}}), got "
                            f"{type(decoder).__name__}: fix the file")
    entries = []
    for key, entry in decoder.items():
        index = _token_id(key, path, f"added_tokens_decoder key {key!r}")
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and isinstance(entry.get("special", False), bool)):
            raise QuantkitError(f"{path}: added_tokens_decoder[{key!r}] must be {{\"content\": text, \"special\": "
                                f"true/false}}, got {str(entry)[:60]}: fix the file")
        special = entry.get("special", False) or entry["content"] in specials
        entries.append((index, AddedToken(entry["content"], special)))
    return entries


def added_file_entries(path: Path, specials: set[str]) -> list[tuple[int, AddedToken]]:
    """added_tokens.json {content: id}: special when the content is a named special token."""
    added = read_json_object(path) or {}
    return [(_token_id(index, path, f"the id of {content!r}"), AddedToken(content, content in specials))
            for content, index in added.items()]


def _token_id(value, path: Path, what: str) -> int:
    """A non-negative integer id, or a string of one (JSON object keys are strings)."""
    if isinstance(value, str) and value.isdecimal():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise QuantkitError(f"{path}: {what} is {value!r}, not a token id (a non-negative integer): fix the file")
    return value


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The sentencepiece tokenizer of a model directory (or hub id, or a tokenizer.model file)."""
    path = os.fspath(path)
    return Tokenizer(path if path.endswith(".model") else resolve_model_dir(path))
