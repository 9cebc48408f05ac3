"""Write the fixed MATH-500 samples of the README's results table (run once; committed).

`math500-l123-s60.jsonl`: 20 problems of each of levels 1, 2 and 3, drawn with a fixed seed
(stratified); `math500-l123-calib.jsonl`: 15 other problems of the same levels (5 each), used
only to choose the triggers' thresholds, never reported; `math500-l123-s60b.jsonl`: 60 more,
drawn with the next seed from the problems neither of the others holds: MATH-500 has only 43
of level 1, so all 18 left of it and 21 of each of levels 2 and 3 (interleaved while all three
last), so that the table can grow to 120 problems (issue #22). Each row keeps MATH-500's fields and adds
`id` = its 0-based line in math500.jsonl. The first two draws are as they were first written.

The sample is written with its levels interleaved (1, 2, 3, 1, 2, 3, ...), so that every
prefix of it is stratified too: an eval that resumes across sessions reports a table over
its first N problems whose levels are in the sample's proportions. The eval keys rows by
`id`, so results written before the order changed stay valid.
"""

from __future__ import annotations

import json
import random
from itertools import zip_longest
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[1] / "edge" / "datasets"
SEED = 20261202
# problems per level in the second sample: level 1 has 18 left after the first draws
SECOND_SAMPLE = {1: 18, 2: 21, 3: 21}


def main() -> None:
    rows = [json.loads(line) for line in (DATASETS / "math500.jsonl").read_text().splitlines()]
    rng = random.Random(SEED)
    more = random.Random(SEED + 1)
    by_level: list[list[dict]] = []
    by_level_b: list[list[dict]] = []
    calib: list[dict] = []
    for level in (1, 2, 3):
        ids = [i for i, r in enumerate(rows) if r["level"] == level]
        drawn = rng.sample(ids, 25)
        by_level.append([{"id": str(i), **rows[i]} for i in sorted(drawn[:20])])
        calib += [{"id": str(i), **rows[i]} for i in sorted(drawn[20:])]
        rest = [i for i in ids if i not in drawn]
        wanted = SECOND_SAMPLE[level]
        chosen = rest if wanted >= len(rest) else more.sample(rest, wanted)
        by_level_b.append([{"id": str(i), **rows[i]} for i in sorted(chosen)])
    sample = [row for group in zip(*by_level, strict=True) for row in group]
    sample_b = [row for group in zip_longest(*by_level_b) for row in group if row is not None]
    for name, chosen in (
        ("math500-l123-s60.jsonl", sample),
        ("math500-l123-calib.jsonl", calib),
        ("math500-l123-s60b.jsonl", sample_b),
    ):
        with (DATASETS / name).open("w", encoding="utf-8") as f:
            for row in chosen:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
