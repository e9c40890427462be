"""Every stage's library function once on a GPU in bf16: time, peak memory and invariants.

``python bench/gpu_smoke.py`` loads a model on ``--device`` (default ``cuda``) in ``--dtype``
(default ``bfloat16``): the tiny random-init Llama (default), the tiny configs of the other
architectures (``--arch``), or a local model directory / hub id (``--model``; offline machines
need it in the hub cache). It runs :func:`sponlab.tools.smoke.run_smoke` (calibration, greedy
allocation, dense reference, TEAL-only baseline, closed-form and trained biases, training with the
memory-bounded KL (top-64 teacher, chunked), TEAL+SPON evaluation, sliding-window evaluation) on
random token blocks and prints seconds and peak CUDA memory per stage; a stage that
breaks a device, dtype or finiteness invariant fails the run. The same function runs in the test
suite on CPU in float32 and bfloat16. Result: ``bench/results/<name>.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
from benchlib import fix_threads, print_table, save_result

from sponlab.model.loading import freeze, load_model, resolve_device, resolve_dtype
from sponlab.model.tiny import tiny_model
from sponlab.tools.smoke import run_smoke


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--model", default=None, help="Model directory or hub id (default: tiny)")
    parser.add_argument("--arch", default="llama", help="Tiny architecture (without --model)")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--name", default="gpu_smoke")
    args = parser.parse_args()
    fix_threads(args.threads)
    device = resolve_device(args.device)  # a clear error when CUDA is requested but absent
    dtype = resolve_dtype(args.dtype, device)
    if args.model:
        model = load_model(args.model, str(device), args.dtype).model
    else:
        model = tiny_model(args.arch, layers=4, hidden=256, vocab=4096).to(device, dtype).eval()
        freeze(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    blocks = torch.randint(0, vocab, (args.blocks, args.length), generator=torch.Generator())
    runs = run_smoke(model, blocks)
    rows = [asdict(r) for r in runs]
    print(f"{args.model or 'tiny ' + args.arch} on {device} in {dtype}")
    print_table(rows, ["stage", "seconds", "peak_mib", "checked"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    save_result(args.name, {"settings": {**vars(args), "device_name": name}, "rows": rows})


if __name__ == "__main__":
    main()
