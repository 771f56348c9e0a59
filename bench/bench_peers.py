"""GPTQ end to end: quantkit against the IST-DASLab reference, llm-compressor and GPTQModel, on the same tokens.

Each contender is a fresh process, the contenders taking turns each round; per run: the wall time of the whole
process, the contender's own time for its quantization loop (model load and saving excluded: quantkit's
`phases` forward + statistics + quantize + transform, the reference's `quant_seconds`, llm-compressor's
`oneshot_s`, GPTQModel's `quantize_s`) and its peak RSS. Afterwards every saved output is scored by one
`quantkit compare` against the base (mean KL per token, top-1, ppl over test.txt); the reference saves nothing
and scores itself (its own `kl` over its first --kl-windows windows, printed apart).

The peers run from their own virtualenvs (../shared/bench/peers-venv.sh builds them under /tmp/peers) with the
drivers beside it; a contender whose interpreter is missing is skipped with a line saying so.

    python ../shared/bench/ref_gptq.py ../shared/models/tiny-llama2-mha --n-samples 128 --seq-len 256 \
        --save-calib /tmp/calib-128x256.pt
    python bench/bench_peers.py --model ../shared/models/tiny-llama2-mha --calib /tmp/calib-128x256.pt --rounds 2
    python bench/bench_peers.py ... --act-order
    python bench/bench_peers.py --llama7b-layer --n-samples 16 --seq-len 2048 --contenders quantkit,reference
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTKIT_SHARED", ROOT.parent / "shared"))  # ../shared: the reference and drivers
BENCH = SHARED / "bench"
PEERS = Path(os.environ.get("PEERS", "/tmp/peers"))
PROBE = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
         "r = subprocess.run(sys.argv[2:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, "
         "env=json.loads(sys.argv[1])); "
         "print(json.dumps({'rc': r.returncode, 'wall': time.perf_counter() - t, 'stdout': r.stdout[-20000:], "
         "'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))")


def measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd in its own helper process: its wall seconds, peak RSS (bytes), exit code and stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env or {})}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(env), *cmd], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def last_json(stdout: str, prefix: str = "") -> dict:
    """The last line of stdout that is a JSON object (after `prefix`), or the JSON document that stdout ends with."""
    lines = stdout.splitlines()
    for i in reversed(range(len(lines))):
        line = lines[i].removeprefix(prefix).strip()
        if line.startswith("{"):
            try:
                return json.loads("\n".join([line, *lines[i + 1:]]))
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON in: {stdout[-500:]}")


def contenders(args, out: Path) -> dict[str, tuple[list[str], dict, callable]]:
    """name -> (command, environment, its own loop seconds from its stdout); outputs under `out`."""
    q = ["--bits", "4", "--group-size", "128"]
    quantkit = [sys.executable, "-m", "quantkit", "quantize", args.model, "--method", "gptq", *q, "--calib",
                args.calib, "--seq-len", str(args.seq_len), "--n-samples", str(args.n_samples), "-o",
                str(out / "quantkit"), "--force", "--json", *(["--act-order"] if args.act_order else [])]
    reference = [sys.executable, str(BENCH / "ref_gptq.py"), args.model, "--method", "gptq", *q, "--calib",
                 args.calib, "--seq-len", str(args.seq_len), "--n-samples", str(args.n_samples), "--no-fp32",
                 "--kl-windows", str(args.kl_windows), *(["--act-order"] if args.act_order else [])]
    llmc = [str(PEERS / "llmc/bin/python"), str(BENCH / "quant_llmc.py"), args.model, args.calib, str(out / "llm-compressor"),
            *q, *(["--actorder", "weight"] if args.act_order else [])]
    gptqmodel = [str(PEERS / "gptqmodel/bin/python"), str(BENCH / "quant_gptqmodel.py"), args.model, args.calib,
                 str(out / "gptqmodel"), *q, *(["--desc-act"] if args.act_order else [])]

    def phases(stdout):
        p = last_json(stdout)["phases"]
        return sum(p.get(k, 0.0) for k in ("forward", "statistics", "quantize", "transform"))
    table = {"quantkit": (quantkit, {}, phases),
             "reference": (reference, {}, lambda s: last_json(s)["quant_seconds"]),
             "llm-compressor": (llmc, {}, lambda s: last_json(s, "RESULT ")["oneshot_s"]),
             "gptqmodel": (gptqmodel, {"GPTQMODEL_CPU_WORKERS": "2"}, lambda s: last_json(s, "RESULT ")["quantize_s"])}
    chosen = {}
    for name in args.contenders.split(","):
        cmd = table[name][0]
        if not Path(cmd[0]).exists():
            print(f"{name}: skipped, no interpreter at {cmd[0]} (bash ../shared/bench/peers-venv.sh builds it)")
            continue
        chosen[name] = table[name]
    return chosen


def llama7b_layer(path: Path, test_text: Path):
    """One decoder layer of Llama-2-7B's shape (bench_dist_quantize.llama7b_layers: random fp16 weights, the demo
    model's tokenizer, vocab 4096), and a short test.txt for the reference's scoring."""
    from bench_dist_quantize import llama7b_layers

    llama7b_layers(path, 1)
    (path / "test.txt").write_text(test_text.read_text(encoding="utf-8")[:40000], encoding="utf-8")


def scores(args, outputs: list[Path]) -> dict[str, dict]:
    """quantkit compare of the saved outputs against the base: mean KL, top-1 and ppl per output directory."""
    cmd = [sys.executable, "-m", "quantkit", "compare", args.model, *map(str, outputs), "--dataset",
           str(Path(args.model) / "test.txt"), "--seq-len", str(args.seq_len), "--dtype", "fp32", "--batch-size", "8",
           "--no-speed", "--json"]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    return {Path(m["path"]).name: {"kl": m["fidelity"]["kl"]["mean"], "top1": m["fidelity"]["top1"]["agreement"],
                                   "ppl": m["perplexity"]["ppl"]} for m in report["models"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(SHARED / "models" / "tiny-llama2-mha"))
    p.add_argument("--calib", help="a saved (n, seq_len) token tensor (ref_gptq.py --save-calib); default: drawn")
    p.add_argument("--llama7b-layer", action="store_true", help="one random layer of Llama-2-7B's shape instead")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kl-windows", type=int, default=40)
    p.add_argument("--contenders", default="quantkit,reference,llm-compressor,gptqmodel")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.llama7b_layer:
            llama7b_layer(tmp / "model", Path(args.model) / "test.txt")
            args.model, args.kl_windows = str(tmp / "model"), 1
        if args.calib is None:
            args.calib = str(tmp / "calib.pt")
            torch.save(torch.randint(0, 4096, (args.n_samples, args.seq_len),
                                     generator=torch.Generator().manual_seed(0)), args.calib)
        table = contenders(args, tmp)
        runs = {name: [] for name in table}
        for _ in range(args.rounds):
            for name, (cmd, env, own) in table.items():
                r = measured(cmd, env)
                if r["rc"] != 0:
                    raise SystemExit(f"{name} failed (exit {r['rc']}): {' '.join(cmd)}")
                runs[name].append({"wall_s": round(r["wall"], 2), "loop_s": round(own(r["stdout"]), 2),
                                   "peak_rss_mb": round(r["rss"] / 2**20), "load": os.getloadavg()[0]})
                if name == "reference":
                    runs[name][-1]["own_kl"] = last_json(r["stdout"])["kl"]
                print(name, runs[name][-1], flush=True)
        saved = [tmp / n for n in table if n != "reference"]
        quality = scores(args, saved) if saved and not args.llama7b_layer else {}
    best = {n: {"wall_s": min(r["wall_s"] for r in rs), "loop_s": min(r["loop_s"] for r in rs),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), **quality.get(n, {})} for n, rs in runs.items()}
    print(json.dumps({"model": "llama2-7b layer (random)" if args.llama7b_layer else args.model,
                      "tokens": [args.n_samples, args.seq_len], "act_order": args.act_order, "runs": runs,
                      "best": best}))


if __name__ == "__main__":
    main()
