"""Build quantkit's bundled demo model: a 5.2M-parameter Llama 2 trained on CPython's own English text.

Steps, all seeded:

1. Corpus. CPython's `pydoc_data.topics` (the language reference topics `help()` shows) plus the
   docstrings of the standard library (modules, classes, functions, methods), one document each.
   Private modules and ones with import side effects (antigravity, this, idlelib, tkinter, turtle,
   turtledemo, test) are skipped. Documents are deduplicated, short ones (< 200 characters)
   dropped, shuffled and split by document into train/valid/test (88/5/7 % of the characters: the
   test split is a little larger so it holds over 30k tokens), each written as documents joined by
   blank lines (about 1.5 MB in all).
2. Tokenizer. A sentencepiece BPE model trained on train.txt with Llama 2's settings (byte fallback,
   split digits, dummy prefix, <unk>=0 <s>=1 </s>=2, identity normalisation), vocabulary 4096,
   plus the Hugging Face tokenizer files, so `transformers.LlamaTokenizer` loads it.
3. Model. quantkit's native `LlamaForCausalLM`: 4 layers, hidden 256, 4 query heads over 2
   key/value heads (grouped-query attention), untied embeddings. Trained in fp32 on the CPU on
   random 256-token windows of the train stream ([BOS] + the ids of all of train.txt) with AdamW,
   warmup and cosine decay.
4. Save. Hugging Face layout: config.json and model.safetensors (fp16, about 10.5 MB). Everything is
   written to a temporary directory next to --out first and moved into place only at the end, so a
   failed run never leaves a half-written model.

The valid and test figures logged at the end follow the evaluation protocol: the whole file as one
stream, one BOS then the sentencepiece ids, non-overlapping 256-token windows (last partial one
dropped), perplexity = exp(mean NLL of the 255 next-token predictions per window), computed on the
fp16-rounded weights that are saved.

Run from the repository root. Training dominates: about 1.1-1.3 s per step on two idle CPU cores,
so 11-13 minutes for the default 600 steps, proportionally longer when the cores are shared
(the bundled model took 27 minutes that way). Same seed, same torch build, same thread count: same
files, byte for byte:

    python demo/train.py [--out demo/model] [--steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import logging
import math
import pkgutil
import random
import sys
import time
import warnings
from pathlib import Path

import safetensors.torch
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
try:
    import quantkit  # noqa: F401
except ModuleNotFoundError:  # run as a plain script without PYTHONPATH
    sys.path.insert(0, str(REPO_ROOT))
from quantkit.io.files import atomic_dir  # noqa: E402
from quantkit.model.config import LlamaConfig  # noqa: E402
from quantkit.model.llama import LlamaForCausalLM, RMSNorm  # noqa: E402

log = logging.getLogger("demo.train")

# -- corpus ----------------------------------------------------------------------------------------

# Never imported: side effects on import (a browser, a printed poem, Tk windows) or test suites.
SKIP_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo",
                          "test", "tests", "idle_test", "pydoc_data"})
MIN_DOC_CHARS = 200
SPLIT_FRACTIONS = {"valid": 0.05, "test": 0.07}  # of the characters; the rest is train
SEQ_LEN = 256


def wanted_module(name: str) -> bool:
    return not any(part.startswith("_") or part in SKIP_MODULES for part in name.split("."))


def import_quietly(name: str):
    """Import a module with its warnings and any output on import swallowed; None if unavailable."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except (ImportError, OSError) as e:  # platform-specific modules (winreg, msvcrt, _gdbm, ...)
        log.debug("skipping %s: %s: %s", name, type(e).__name__, e)
        return None


def stdlib_modules() -> list:
    """Public standard-library modules and their submodules, in a fixed (sorted) order."""
    modules = []

    def visit(name: str):
        module = import_quietly(name)
        if module is None:
            return
        modules.append(module)
        if hasattr(module, "__path__"):  # a package: descend (iter_modules yields sorted names)
            for info in pkgutil.iter_modules(module.__path__, name + "."):
                if wanted_module(info.name):
                    visit(info.name)

    for name in sorted(sys.stdlib_module_names):
        if wanted_module(name):
            visit(name)
    return modules


def docstrings(module) -> list[str]:
    """inspect.getdoc of the module, its public classes and routines, and their public members."""
    objects = [module]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        objects.append(obj)
        if inspect.isclass(obj):
            objects += [member for member_name, member in sorted(vars(obj).items())
                        if not member_name.startswith("_")
                        and (inspect.isroutine(member) or inspect.isdatadescriptor(member))]
    docs = []
    for obj in objects:
        try:
            doc = inspect.getdoc(obj)
        except (AttributeError, TypeError, ValueError) as e:  # odd objects with broken __doc__
            log.debug("no docstring for %r: %s", obj, e)
            continue
        if isinstance(doc, str):
            docs.append(doc)
    return docs


def collect_documents() -> list[str]:
    """pydoc topics plus stdlib docstrings: deduplicated, >= MIN_DOC_CHARS, sorted."""
    import pydoc_data.topics

    raw = list(pydoc_data.topics.topics.values())
    log.info("pydoc_data.topics: %d topics", len(raw))
    modules = stdlib_modules()
    for module in tqdm(modules, desc="docstrings", unit="module", leave=False):
        raw += docstrings(module)
    log.info("docstrings of %d standard-library modules: %d texts in all", len(modules), len(raw))
    docs = set()
    for doc in raw:
        doc = doc.replace("\r\n", "\n").replace("\r", "\n").strip()
        if len(doc) >= MIN_DOC_CHARS:
            docs.add(doc)
    return sorted(docs)  # sorted: the shuffle below depends only on the seed


def split_documents(docs: list[str], seed: int) -> dict[str, str]:
    """Shuffle documents and split them (whole documents) by character share into train/valid/test."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    total = sum(len(d) for d in docs)
    parts: dict[str, list[str]] = {"valid": [], "test": []}
    i = 0
    for name, fraction in SPLIT_FRACTIONS.items():
        size = 0
        while size < fraction * total and i < len(docs):
            parts[name].append(docs[i])
            size += len(docs[i])
            i += 1
    parts["train"] = docs[i:]
    for name in ("train", "valid", "test"):
        n_chars = sum(len(d) for d in parts[name])
        log.info("%-5s %5d documents, %8d characters (%.1f%%)", name, len(parts[name]), n_chars,
                 100 * n_chars / total)
    return {name: "\n\n".join(parts[name]) for name in ("train", "valid", "test")}


# -- tokenizer -------------------------------------------------------------------------------------

TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                    "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": False,
                    "model_max_length": 1024}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2}


def train_tokenizer(train_text: str, out_dir: Path, vocab_size: int, seed: int) -> spm.SentencePieceProcessor:
    """sentencepiece BPE with Llama 2's trainer settings; writes out_dir/tokenizer.model.

    sentencepiece trains on lines, so it is fed the lines of train.txt (newlines themselves are
    encoded through byte fallback, as in Llama 2). Training from an iterator into memory keeps
    file paths out of the model's trainer_spec, so the file is byte-for-byte reproducible.
    """
    spm.set_random_generator_seed(seed)
    lines = train_text.split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_unicode_script=True, split_by_whitespace=True,
        split_by_number=True, max_sentencepiece_length=16, character_coverage=0.99995,
        max_sentence_length=max(4192, max(len(line.encode("utf-8")) for line in lines) + 1),
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=2, minloglevel=1,
    )
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    for name, content in (("tokenizer_config.json", TOKENIZER_CONFIG),
                          ("special_tokens_map.json", SPECIAL_TOKENS_MAP),
                          ("generation_config.json", GENERATION_CONFIG)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return spm.SentencePieceProcessor(model_file=str(out_dir / "tokenizer.model"))


def token_stream(sp: spm.SentencePieceProcessor, text: str) -> torch.Tensor:
    """The evaluation protocol's stream: one BOS, then the ids of the whole text (no BOS/EOS)."""
    return torch.tensor([sp.bos_id()] + sp.encode(text), dtype=torch.long)


# -- model -----------------------------------------------------------------------------------------

def demo_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, torch_dtype="float16")


def init_weights(model: nn.Module, std: float = 0.02):
    """As transformers' Llama: normal(0, std) linears and embedding, zero biases, ones for RMSNorm."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warmup to peak, then cosine decay to floor * peak at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def window_nll(model: nn.Module, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = 16):
    """Mean NLL over non-overlapping seq_len windows (last partial dropped), and the window count."""
    n_windows = len(ids) // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    model.eval()
    total = 0.0
    for batch in windows.split(batch_size):
        logits = model(batch).float()
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                 reduction="sum").item()
    model.train()
    return total / (n_windows * (seq_len - 1)), n_windows


def train_model(model: nn.Module, data: torch.Tensor, valid: torch.Tensor, args) -> float:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, round(args.warmup * args.steps))
    model.train()
    smoothed, start = None, time.perf_counter()
    with logging_redirect_tqdm():
        bar = tqdm(range(args.steps), desc="train", unit="step")
        for step in bar:
            lr = lr_at(step, args.steps, args.lr, warmup, floor=0.1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(data) - SEQ_LEN - 1, (args.batch_size,), generator=generator)
            batch = torch.stack([data[s: s + SEQ_LEN + 1] for s in starts.tolist()])
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            value = loss.item()
            smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
            bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}")
            if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
                log.info("step %4d/%d  loss %.4f (smoothed %.4f)  lr %.2e  grad-norm %.2f  %.2f s/step",
                         step + 1, args.steps, value, smoothed, lr, grad_norm.item(),
                         (time.perf_counter() - start) / (step + 1))
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                nll, _ = window_nll(model, valid)
                log.info("step %4d/%d  valid loss %.4f (ppl %.2f)", step + 1, args.steps, nll, math.exp(nll))
    return smoothed


def save_model(model: nn.Module, config: LlamaConfig, out_dir: Path):
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    tensors = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "model",
                   help="output directory (default: demo/model next to this script)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for the split, tokenizer and training")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of --steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=25, help="log the train loss every N steps")
    p.add_argument("--eval-every", type=int, default=100, help="log the valid loss every N steps (0: at the end only)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (skipped modules, ...)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    started = time.perf_counter()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)

    out = args.out.resolve()
    with atomic_dir(out, overwrite=True) as tmp:  # moved into place only once complete; removed on any failure
        texts = split_documents(collect_documents(), args.seed)
        for name, text in texts.items():
            (tmp / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
        log.info("corpus: %.2f MB", sum(len(t.encode("utf-8")) + 1 for t in texts.values()) / 1e6)

        config = demo_config()
        log.info("training the tokenizer (BPE, vocabulary %d)", config.vocab_size)
        sp = train_tokenizer(texts["train"] + "\n", tmp, config.vocab_size, args.seed)
        streams = {name: token_stream(sp, text + "\n") for name, text in texts.items()}
        for name, ids in streams.items():
            log.info("%-5s %7d tokens (%.2f characters/token)", name, len(ids), (len(texts[name]) + 1) / len(ids))

        model = LlamaForCausalLM(config)
        init_weights(model)
        log.info("model: %.2fM parameters, %d steps of %d x %d tokens", sum(p.numel() for p in model.parameters())
                 / 1e6, args.steps, args.batch_size, SEQ_LEN)
        train_loss = train_model(model, streams["train"], streams["valid"], args)

        # Evaluate what is saved: the fp16-rounded weights.
        model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
        valid_nll, valid_windows = window_nll(model, streams["valid"])
        test_nll, test_windows = window_nll(model, streams["test"])
        log.info("valid loss %.4f (ppl %.2f, %d windows); test loss %.4f (ppl %.2f, %d windows)",
                 valid_nll, math.exp(valid_nll), valid_windows, test_nll, math.exp(test_nll), test_windows)

        save_model(model, config, tmp)
        for path in tmp.iterdir():  # safetensors' save_file makes its files 0600
            path.chmod(0o644)
    print(f"wrote {out}: train loss {train_loss:.3f}, valid loss {valid_nll:.3f}, "
          f"test ppl {math.exp(test_nll):.2f} ({len(streams['test'])} tokens, {test_windows} windows), "
          f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
