"""Build the small data files bundled with the package from the tinylm model (run on the CPU).

``certkv/data/demo_step.safetensors``: layer 3 of tinylm (an outlier-channel layer) on the first 1024
bytes of the held-out sample: q of the last 8 positions [1, 4, 8, 128] and k, v of all positions
[1, 2, 1024, 128] (bf16, post-RoPE). ``certkv demo`` replays them as 8 decode steps.

Usage: ``python -m certkv.tinylm.bundle``
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from certkv.capture import capture, load_model
from certkv.tinylm.data import BOS, encode

DATA = Path(__file__).resolve().parent.parent / "data"
DEMO_LAYER = 3
DEMO_CONTEXT = 1024
DEMO_STEPS = 8


def sample_ids(length: int) -> torch.Tensor:
    text = (DATA / "heldout_sample.txt").read_text(encoding="utf-8")
    return torch.tensor([[BOS, *encode(text)[: length - 1]]])


def main() -> None:
    model = load_model()
    cap = capture(model, sample_ids(DEMO_CONTEXT))
    tensors = {
        "q": cap.q[DEMO_LAYER][:, :, -DEMO_STEPS:].contiguous(),
        "k": cap.k[DEMO_LAYER].contiguous(),
        "v": cap.v[DEMO_LAYER].contiguous(),
    }
    meta = {"layer": str(DEMO_LAYER), "scaling": repr(cap.scaling[DEMO_LAYER]), "source": "tinylm, heldout_sample.txt"}
    save_file(tensors, str(DATA / "demo_step.safetensors"), metadata=meta)
    print({k: tuple(v.shape) for k, v in tensors.items()})


if __name__ == "__main__":
    main()
