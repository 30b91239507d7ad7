"""Build the trace bundled with the package, which ``certkv audit`` checks when given no argument.

``certkv/data/trace/``: the repo's tiny model (certkv/data/tinylm) decoding 8 tokens after the first
1016 tokens of the held-out sample, every layer and head recorded, default ``CertConfig``. Recorded on
the CPU, so an audit on a CPU of the same platform also compares stage-3 outputs bit for bit.

Usage: ``python -m certkv.tinylm.bundle``
"""

from __future__ import annotations

import shutil
from pathlib import Path

from certkv.capture import DEFAULT_MODEL
from certkv.record import record

DATA = Path(__file__).resolve().parent.parent / "data"
TRACE = DATA / "trace"
PROMPT_TOKENS = 1016
NEW_TOKENS = 8


def main() -> None:
    shutil.rmtree(TRACE, ignore_errors=True)
    text = (DATA / "heldout_sample.txt").read_text(encoding="utf-8")
    print(record(DEFAULT_MODEL, text, TRACE, max_new_tokens=NEW_TOKENS, prompt_tokens=PROMPT_TOKENS))


if __name__ == "__main__":
    main()
