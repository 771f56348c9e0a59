"""What saving the base logits costs in accuracy: the .qkl encodings against the in-memory comparison.

    python bench/bench_base_logits.py demo/model out/demo-int4 --text demo/model/test.txt --seq-len 256

For each encoding (uint16, and top-k buckets), the relative error of the mean KL and of its 99th
percentile, the file size, and whether top-1 / delta-p / perplexities are unchanged.
"""

import argparse
import tempfile
from pathlib import Path

import quantkit
from quantkit.eval import BaseLogits, eval_data, evaluate, save_base_logits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("base")
    parser.add_argument("model")
    parser.add_argument("--text", required=True)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--top-k", type=int, nargs="*", default=[16, 64, 256])
    args = parser.parse_args()
    tok = quantkit.load_tokenizer(args.base)
    data = eval_data(tok, args.text, seq_len=args.seq_len)
    base, model = quantkit.load(args.base, dtype="fp32"), quantkit.load(args.model, dtype="fp32")
    exact = evaluate(model, data, base=base, batch_size=8, progress=False)
    print(f"{data.n_tokens} tokens; in-memory mean KL {exact.fidelity['kl']['mean']:.6e}")
    print("| encoding | file MB | mean KL rel. error | KL p99 rel. error | top-1 changed (tokens) | delta-p RMS, ppl unchanged |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for k in [None, *args.top_k]:
            path = Path(tmp) / "base.qkl"
            save_base_logits(base, tok, data, path, top_k=k, batch_size=8, progress=False)
            saved = BaseLogits(path)
            saved.check_matches(data, model.config.vocab_size, tok)
            r = evaluate(model, data, base=saved, batch_size=8, progress=False)
            a, b = r.fidelity, exact.fidelity
            top1_tokens = round(abs(a["top1"]["agreement"] - b["top1"]["agreement"]) * data.n_tokens)
            same = (abs(a["delta_p"]["rms"] / b["delta_p"]["rms"] - 1) < 1e-6
                    and abs(r.base_perplexity.ppl / exact.base_perplexity.ppl - 1) < 1e-9)
            print(f"| {'uint16' if k is None else f'top-{k}'} | {path.stat().st_size / 1e6:.1f} | "
                  f"{a['kl']['mean'] / b['kl']['mean'] - 1:+.2e} | {a['kl']['p99'] / b['kl']['p99'] - 1:+.2e} | "
                  f"{top1_tokens} | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
