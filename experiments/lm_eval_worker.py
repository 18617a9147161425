"""lm-evaluation-harness's side of :mod:`experiments.scoring_vs_lm_eval`, run by the Python of
a separate environment that has ``lm_eval`` installed (never imported by the project).

    <lm-eval python> experiments/lm_eval_worker.py <model folder> <requests.json> <batch size> <threads>

Loads the model with ``HFLM`` (fp32, CPU), scores two requests untimed, prints ``READY`` with
its package versions, then for each line ``run`` read on stdin scores every (context,
continuation) pair of ``requests.json`` with ``HFLM.loglikelihood`` and prints one line
``RESULT {"seconds": ..., "loglikelihoods": [...]}``; it ends at end of input.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM


def instances(pairs: list[list[str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, (context, continuation), i) for i, (context, continuation) in enumerate(pairs)]


def main() -> None:
    folder, path, batch_size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    with open(path, encoding="utf-8") as handle:
        pairs = json.load(handle)
    lm = HFLM(pretrained=folder, backend="causal", dtype="float32", device="cpu", batch_size=batch_size)
    lm.loglikelihood(instances(pairs[:2]), disable_tqdm=True)  # warm-up
    versions = {name: metadata.version(name) for name in ("lm_eval", "torch", "transformers")}
    print("READY " + json.dumps(versions), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            continue
        requests = instances(pairs)
        begin = time.perf_counter()
        results = lm.loglikelihood(requests, disable_tqdm=True)
        seconds = time.perf_counter() - begin
        print("RESULT " + json.dumps({"seconds": seconds, "loglikelihoods": [value for value, _ in results]}), flush=True)


if __name__ == "__main__":
    main()
