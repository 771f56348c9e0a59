"""Calibration data for GPTQ: sources (wikitext2, c4, ptb, local files) sampled into [n, seq_len] token blocks.
Layer 1 (installed as quantkit.calibrate): imports only quantkit.errors and quantkit.io.

The protocol follows the GPTQ paper (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323: "128 random 2048 token segments
from the C4 dataset") and its reference code (github.com/IST-DASLab/gptq, datautils.py), which the
Llama 2 quantization papers reuse:

- wikitext2 / ptb: the train split's rows joined ("\\n\\n"; ptb-new: " ") into one text, tokenized
  once with a single BOS, and n_samples windows of seq_len tokens at random offsets (mode "random");
- c4: the first train shard (en/c4-train.00000-of-01024.json.gz); random documents with at least
  seq_len tokens, each tokenized alone with BOS, one window at a random offset in each (mode "document").

`KNOWN_DATASETS` records the exact `datasets.load_dataset` arguments. Without the hub (offline),
those names fail with a QuantkitError that points to local files: .txt (the whole text), .jsonl/.json,
.parquet and .csv (a text column, read through `datasets.load_dataset`), a `save_to_disk` directory,
a list of strings, or ready token ids (a LongTensor [n, seq_len], a .pt or .safetensors file).

Sampling draws from `torch.Generator().manual_seed(seed)` only: a seed gives the same tensor on
every run. Tokenizations are cached on disk (calibrate.cache) keyed by the text's content, the
tokenizer.model bytes and the mode, so a second run does not tokenize again.

    >>> tokens = calibration_tokens("calib.txt", quantkit.load_tokenizer(model_dir), n_samples=128, seq_len=2048)
    >>> tokens.shape, tokens.dtype
    (torch.Size([128, 2048]), torch.int64)
"""

from quantkit.calibrate.sampling import calibration_tokens
from quantkit.calibrate.sources import KNOWN_DATASETS, HubDataset, load_text

__all__ = ["KNOWN_DATASETS", "HubDataset", "calibration_tokens", "load_text"]
